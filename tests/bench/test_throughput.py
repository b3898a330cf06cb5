"""`tritium bench throughput`'s parts that run without a GPU: the workload, the random-weight engine, the mapping
of Tritium's weights onto transformers' model, the model shapes, the command's argument checks, and a tensor-parallel
run on the CPU (a check of the code path)."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.models.helpers import save_family
from tritium import default_model_path
from tritium.bench.hf_peer import hf_state_dict
from tritium.bench.throughput import Workload, _warm_up, active_expert_share, result_name, run_throughput_bench
from tritium.cli import main
from tritium.engine.config import EngineConfig
from tritium.engine.llm_engine import LLMEngine
from tritium.engine.model_runner import weight_bytes
from tritium.engine.sampling_params import SamplingParams
from tritium.models.config import ModelConfig
from tritium.models.loader import load_model, random_model
from tritium.models.shapes import MODEL_SHAPES, shape_config

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")


def test_workload_lengths_are_in_range_and_reproducible():
    w = Workload(num_prompts=50, input_len=(3, 9), output_len=(1, 4), seed=7)
    reqs = w.requests(vocab_size=11)
    assert len(reqs) == 50
    assert all(3 <= len(ids) <= 9 and 1 <= n <= 4 and all(0 <= t < 11 for t in ids) for ids, n in reqs)
    assert {len(ids) for ids, _ in reqs} == set(range(3, 10))  # the whole range is drawn
    assert reqs == w.requests(vocab_size=11)
    assert reqs != Workload(50, (3, 9), (1, 4), seed=8).requests(vocab_size=11)


@pytest.mark.parametrize("name", list(MODEL_SHAPES))
def test_model_shapes_parse(name):
    cfg = ModelConfig.from_dict({**MODEL_SHAPES[name], "torch_dtype": "bfloat16"})
    assert cfg.num_heads % cfg.num_kv_heads == 0 and cfg.head_dim * cfg.num_heads >= cfg.hidden_size // 2


def test_llama_31_8b_shape_has_8b_parameters():
    cfg = ModelConfig.from_dict({**MODEL_SHAPES["llama-3.1-8b"], "torch_dtype": "bfloat16"})
    d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * cfg.intermediate_size + 2 * d
    total = cfg.num_layers * per_layer + 2 * cfg.vocab_size * d + d
    assert total == 8_030_261_248  # Meta's published count for Llama 3.1 8B


def test_engine_on_random_weights_runs_and_counts_its_steps():
    raw = {**MODEL_SHAPES["qwen3-0.6b"], "torch_dtype": "float32", "num_hidden_layers": 2, "vocab_size": 512,
           "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16}
    cfg = ModelConfig.from_dict(raw)
    with pytest.raises(ValueError, match="skip_tokenizer_init=True"):
        LLMEngine(cfg, EngineConfig(device="cpu"))
    engine = LLMEngine(cfg, EngineConfig(device="cpu", skip_tokenizer_init=True, block_size=4, max_model_len=64))
    engine.add_request([1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.add_request([7, 8], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.step()
    assert (engine.last_step.num_seqs, engine.last_step.num_tokens, engine.last_step.context_tokens) == (2, 7, 7)
    engine.step()  # two decodes: each attends its whole context, the new token included
    assert (engine.last_step.num_seqs, engine.last_step.num_tokens, engine.last_step.context_tokens) == (2, 2, 9)
    while engine.has_unfinished():
        engine.step()
    norms = [p for n, p in engine.runner.model.named_parameters() if "norm" in n]
    assert norms and all(bool((p == 1).all()) for p in norms)
    assert 0.015 < engine.runner.model.lm_head.weight.std().item() < 0.025


def test_warm_up_meets_every_power_of_two_decode_batch():
    raw = {**MODEL_SHAPES["llama-3.2-1b"], "torch_dtype": "float32", "num_hidden_layers": 1, "vocab_size": 64,
           "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1}
    engine = LLMEngine(ModelConfig.from_dict(raw), EngineConfig(device="cpu", skip_tokenizer_init=True, block_size=4,
                       max_model_len=64, max_num_seqs=8))
    sizes = []
    step = engine.step

    def counting_step():
        finished = step()
        if engine.last_step.num_tokens == engine.last_step.num_seqs:
            sizes.append(engine.last_step.num_seqs)
        return finished

    engine.step = counting_step
    _warm_up(engine, Workload(20, (5, 30), (1, 2)).requests(64))
    assert {1, 2, 4, 8} <= set(sizes) and max(sizes) == 8
    assert not engine.has_unfinished() and engine.pages.num_free == len(engine.pages.ref_count)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "gemma3", "qwen3_moe"])
def test_hf_state_dict_is_transformers_state_dict(family, tmp_path):
    hf = save_family(family, tmp_path)
    ours = hf_state_dict(load_model(tmp_path, torch.float32, "cpu"))
    theirs = {k: v for k, v in hf.state_dict().items() if "rotary" not in k}
    if hf.config.tie_word_embeddings:
        theirs.pop("lm_head.weight")
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k


@cpu_only
@pytest.mark.parametrize(("args", "message"), [
    ([], "give one of --model-config NAME or --model MODEL"),
    (["--model-config", "llama-3.1-8b", "--model", "x"], "give one of"),
    (["--model-config", "gpt-5"], "unknown --model-config 'gpt-5'"),
    (["--model-config", "qwen3-0.6b", "--input-len", "9", "3"], "--input-len needs 1 <= MIN <= MAX"),
    (["--model-config", "qwen3-0.6b", "--num-prompts", "0"], "--num-prompts must be >= 1"),
])
def test_bench_throughput_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "throughput", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@cpu_only
def test_bench_throughput_needs_a_gpu(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "throughput", "--model-config", "qwen3-0.6b"])
    assert exit_info.value.code == 2
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.parametrize(("single", "options", "mode"), [
    (False, {}, "batch"), (True, {"block_size": 16}, "single"), (False, {"enforce_eager": True}, "batch-eager"),
    (True, {"block_size": 64, "enforce_eager": False}, "single-page64"),
    (False, {"tensor_parallel_size": 4}, "batch-tp4"),
    (False, {"kv_cache_dtype": "fp8"}, "batch-kvfp8"), (False, {"kv_cache_dtype": "fp8_e4m3"}, "batch-kvfp8"),
])
def test_result_names_tell_modes_apart(single, options, mode):
    env = {"card": "NVIDIA H100 80GB HBM3", "date": "2026-11-27 12:00 UTC", "commit": "abc1234"}
    name = result_name(env, "meta-llama/Llama-3.1-8B", single, EngineConfig(**options))
    assert name == f"throughput-NVIDIA_H100_80GB_HBM3-meta-llama_Llama-3.1-8B-{mode}-2026-11-27-abc1234"


def test_two_ranks_on_the_cpu_report_their_roofline_and_all_reduce_share(tmp_path):
    folder = Path(default_model_path())
    config = EngineConfig(device="cpu", tensor_parallel_size=2, max_num_seqs=4)
    report = run_throughput_bench(str(folder), Workload(3, (6, 12), (4, 8)), out_dir=tmp_path, config=config)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:  # float32 on the CPU: 4 bytes a weight
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    # Each rank holds half of every matrix and the whole of every norm (the embedding is the tied LM head).
    per_rank = sum(4 * torch.Size(s).numel() // (1 if "norm" in name else 2) for name, s in shapes.items())
    assert report["tensor_parallel_size"] == 2 and report["rank_bytes"]["weight_bytes"] == per_rank
    decode = [r for r in report["steps"] if r["decode_only"]]
    # (CPU figures say nothing of speed: a busy machine's clock-timed copy rate or all-reduces can exceed a step's)
    assert decode and all(r["roofline"] > 0 and r["all_reduce_share"] > 0 for r in decode)
    assert report["tritium"]["decode_all_reduce_share_median"] > 0 and report["transformers"] is None
    assert len(list(tmp_path.glob("throughput-*-tp2-*.json"))) == 1


def test_roofline_counts_the_experts_a_step_picks():
    """A MoE model's decode step reads the dense weights and the share of experts its tokens pick under uniform
    routing: k / E of them for one token, nearly all for many."""
    cfg = ModelConfig.from_dict({**MODEL_SHAPES["mixtral-8x7b"], "torch_dtype": "float32", "num_hidden_layers": 1,
                                 "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                                 "num_attention_heads": 2, "num_key_value_heads": 1})
    model = random_model(cfg, torch.float32, "cpu")
    dense, experts = weight_bytes(model)
    assert experts == 4 * 8 * 3 * 32 * 48  # 8 experts of three 32x48 float32 matrices
    assert dense == 4 * (32 * (32 + 2 * 16) + 32 * 32 + 8 * 32 + 64 * 32 + 3 * 32)  # attention, router, head, norms
    assert active_expert_share(cfg, 1) == pytest.approx(2 / 8)
    assert active_expert_share(cfg, 2) == pytest.approx(1 - (6 / 8) ** 2)
    assert active_expert_share(cfg, 256) == pytest.approx(1.0)
    assert active_expert_share(shape_config("llama-3.2-1b"), 8) == 0.0
