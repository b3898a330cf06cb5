"""An fp8 (e4m3) KV cache in the engine, on the CPU: pages hold torch's quantisation of the rotated keys and the values
with the checkpoint's or the measured scales; greedy generation agrees with a cache in the model's dtype on most
tokens; prefix-cache hits, preemption and the Triton backend (interpreter) work on fp8 pages."""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

import tritium.models.llama as llama
from tests.models.test_llama import save_family
from tritium import LLM, SamplingParams, default_model_path
from tritium.engine.config import EngineConfig
from tritium.engine.llm_engine import LLMEngine
from tritium.engine.worker import kv_page_bytes, load_shard
from tritium.models.attention import KV_SCALE_TARGET, AttentionMetadata
from tritium.models.config import ModelConfig
from tritium.ops.kv_cache import quantize_fp8

FP8 = torch.float8_e4m3fn
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3")
    save_family("llama3", path)
    return path


def prompts(n: int, seed: int = 0, vocab: int = 96, shared: int = 0) -> list[list[int]]:
    """n random prompts of 3 to 39 tokens; the first `shared` tokens common to all."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(0, vocab, (shared,), generator=g).tolist()
    return [common + torch.randint(0, vocab, (int(k),), generator=g).tolist()
            for k in torch.randint(3, 40, (n,), generator=g)]


def generate(path, token_prompts: list[list[int]], params: SamplingParams = GREEDY, **options) -> list[list[int]]:
    llm = LLM(str(path), skip_tokenizer_init=True, **options)
    outs = llm.generate([{"prompt_token_ids": p} for p in token_prompts], params, use_tqdm=False)
    assert llm.engine.pages.num_free == llm.engine.pages.num_pages
    return [o.outputs[0].token_ids for o in outs]


def agreement(runs: list[list[int]], base: list[list[int]]) -> float:
    """The fraction of generated tokens equal to the base run's at the same position."""
    return sum(a == b for run, ref in zip(runs, base) for a, b in zip(run, ref)) / sum(len(r) for r in base)


def test_fp8_page_takes_half_the_bytes():
    config = EngineConfig(dtype="bfloat16", device="cpu")
    model = load_shard(default_model_path(), config, torch.device("cpu"))
    bf16 = kv_page_bytes(model, config)
    assert bf16 == 2 * 8 * 16 * 4 * 32 * 2  # K and V, 8 layers, 16 tokens, 4 KV heads of 32
    assert kv_page_bytes(model, dataclasses.replace(config, kv_cache_dtype="fp8")) * 2 == bf16
    fp32 = dataclasses.replace(config, dtype="float32")
    assert kv_page_bytes(load_shard(default_model_path(), fp32, torch.device("cpu")), fp32) == 2 * bf16


def test_scales_stay_float32_in_a_bfloat16_model():
    """The kernel takes k/v descales as float32: a model built in bfloat16 (random weights too) keeps them so."""
    config = EngineConfig(dtype="bfloat16", device="cpu")
    for model in (load_shard(default_model_path(), config, torch.device("cpu")),
                  load_shard(ModelConfig.load(default_model_path()), config, torch.device("cpu"))):
        attn = model.model.layers[0].self_attn
        assert model.lm_head.weight.dtype == torch.bfloat16
        assert attn.k_scale.dtype == attn.v_scale.dtype == torch.float32


def add_scales(path, tensors: dict[str, torch.Tensor]) -> None:
    """A second weights file beside the model's, as quantisation tools write their scales."""
    save_file(tensors, str(path / "kv_scales.safetensors"))


@pytest.mark.parametrize(("names", "expected"), [
    ({"self_attn.k_scale": 0.004, "self_attn.v_scale": 0.003}, (0.004, 0.003)),
    ({"self_attn.k_proj.k_scale": 0.004, "self_attn.v_proj.v_scale": 0.003}, (0.004, 0.003)),  # ModelOpt
    ({"self_attn.k_proj.output_scale": 0.004, "self_attn.v_proj.output_scale": 0.003}, (0.004, 0.003)),  # Quark
    ({"self_attn.kv_scale": 0.004}, (0.004, 0.004)),  # the older single scale serves K and V
    ({"self_attn.k_scale": 0.004}, (0.004, 1.0)),  # none for V: 1.0
], ids=["attention", "modelopt", "quark", "kv_scale", "k_only"])
def test_checkpoint_scales_are_loaded(names, expected, tmp_path):
    save_family("llama3", tmp_path)
    # Layer 1 gets twice layer 0's scales: each layer's own reaches it. Scalars as some tools write them ([]).
    add_scales(tmp_path, {f"model.layers.{i}.{n}": torch.tensor(s * (1 + i)) for n, s in names.items() for i in (0, 1)})
    engine = LLMEngine(tmp_path, EngineConfig(skip_tokenizer_init=True, kv_cache_dtype="fp8", block_size=4))
    for i, layer in enumerate(engine.runner.model.model.layers):
        got = (layer.self_attn.k_scale.item(), layer.self_attn.v_scale.item())
        want = tuple(s * (1 + i) if s != 1.0 else 1.0 for s in expected)
        assert got == pytest.approx(want, rel=1e-6)
        assert layer.self_attn.k_scale.dtype == torch.float32


@pytest.mark.parametrize("value", [[0.1, 0.2], -1.0, float("inf"), 0.0, float("nan")])
def test_bad_checkpoint_scale_is_named(value, tmp_path):
    save_family("llama3", tmp_path)
    add_scales(tmp_path, {"model.layers.1.self_attn.k_scale": torch.tensor(value)})
    message = r"kv_scales.safetensors: model.layers.1.self_attn.k_scale must be one positive finite number, got"
    with pytest.raises(ValueError, match=message):
        LLMEngine(tmp_path, EngineConfig(skip_tokenizer_init=True, kv_cache_dtype="fp8"))


def test_scale_of_a_missing_layer_has_no_place(tmp_path):
    save_family("llama3", tmp_path)
    add_scales(tmp_path, {"model.layers.7.self_attn.k_scale": torch.tensor(0.1)})
    with pytest.raises(ValueError, match=r"weight model.layers.7.self_attn.k_scale has no place"):
        LLMEngine(tmp_path, EngineConfig(skip_tokenizer_init=True))


def layer0_kv(engine: LLMEngine, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's rotated keys (float64) and values for a prompt, from the model's own modules."""
    model = engine.runner.model
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(ids)))
        q_size, kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        _, k, v = attn.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
    k = k.reshape(len(ids), attn.num_kv_heads, attn.head_dim).double()
    half = attn.head_dim // 2
    cos, sin = model.cos_sin_cache.double()[: len(ids)][:, None, :].chunk(2, dim=-1)
    rotated = torch.cat([k[..., :half] * cos - k[..., half:] * sin, k[..., half:] * cos + k[..., :half] * sin], -1)
    return rotated, v.reshape(len(ids), attn.num_kv_heads, attn.head_dim)


def test_fp8_pages_hold_the_reference_quantisation(model_dir, tmp_path):
    """After a prompt's prefill, layer 0's pages hold quantize_fp8(rotated k, k_scale) and quantize_fp8(v, v_scale)
    (x / scale saturated at 448, rounded by torch) at the prompt's slots, with the checkpoint's scales: small enough
    that the largest keys saturate."""
    for f in model_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    ids = prompts(1, seed=4)[0]
    engine = LLMEngine(tmp_path, EngineConfig(skip_tokenizer_init=True, block_size=4))
    rotated, v = layer0_kv(engine, ids)
    k_scale, v_scale = rotated.abs().max().item() / 500, v.abs().max().item() / 300
    add_scales(tmp_path, {"model.layers.0.self_attn.k_scale": torch.tensor(k_scale),
                          "model.layers.0.self_attn.v_scale": torch.tensor(v_scale)})
    engine = LLMEngine(tmp_path, EngineConfig(skip_tokenizer_init=True, block_size=4, kv_cache_dtype="fp8"))
    k_cache, v_cache = engine.runner.kv_caches[0]
    assert k_cache.dtype == FP8 and v_cache.dtype == FP8
    [seq] = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.step()
    pages = torch.tensor(seq.pages)
    got_k = k_cache[pages].reshape(-1, *k_cache.shape[2:])[: len(ids)]
    got_v = v_cache[pages].reshape(-1, *v_cache.shape[2:])[: len(ids)]
    want_k = quantize_fp8(rotated.float(), torch.tensor([k_scale], dtype=torch.float32))
    want_v = quantize_fp8(v, torch.tensor([v_scale], dtype=torch.float32))
    assert torch.equal(got_k.view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(got_v.view(torch.uint8), want_v.view(torch.uint8))
    assert got_k.float().abs().max() == 448


def test_calculate_kv_scales_on_the_first_step(model_dir, monkeypatch):
    """The first step sets each layer's scales from its own k (the longest rotated pair) and v, mapped to
    KV_SCALE_TARGET; later steps (decodes, a new prompt) leave them as they are."""
    seen = []
    real = llama.paged_attention

    def spy(q, k, v, *args):
        meta = args[4]
        if meta.calculate_kv_scales:
            seen.append((k.clone(), v.clone()))
        return real(q, k, v, *args)

    monkeypatch.setattr(llama, "paged_attention", spy)
    engine = LLMEngine(model_dir, EngineConfig(skip_tokenizer_init=True, block_size=4, kv_cache_dtype="fp8",
                                               calculate_kv_scales=True))
    first, later = prompts(2, seed=5), prompts(1, seed=6)
    for p in first:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()
    layers = engine.runner.model.model.layers
    assert len(seen) == len(layers)  # each layer measured once, in the first step
    assert seen[0][0].shape[0] == sum(len(p) for p in first)
    scales = []
    for layer, (k, v) in zip(layers, seen):
        half = k.shape[-1] // 2
        k_max = (k[..., :half].double() ** 2 + k[..., half:].double() ** 2).sqrt().max().item()
        want = (k_max / KV_SCALE_TARGET, v.double().abs().max().item() / KV_SCALE_TARGET)
        got = (layer.self_attn.k_scale.item(), layer.self_attn.v_scale.item())
        assert got == pytest.approx(want, rel=1e-5) and not got == pytest.approx((1.0, 1.0), rel=0.5)
        scales.append(got)
    engine.add_request(later[0], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert len(seen) == len(layers)
    assert [(lay.self_attn.k_scale.item(), lay.self_attn.v_scale.item()) for lay in layers] == scales


def test_calculate_kv_scales_needs_fp8():
    with pytest.raises(ValueError, match="calculate_kv_scales needs an fp8 KV cache"):
        EngineConfig(calculate_kv_scales=True)


def test_greedy_agrees_with_model_dtype_tiny_model(model_dir):
    """12 prompts x 8 greedy tokens on the tiny random Llama-3 (float32): measured 100% of the tokens equal with
    scales 1.0 and with measured ones (fp8 moves the scores by up to ~6%; a random model's top two logits are rarely
    that close). The floor, 85%, leaves room for another platform's float32 and still fails when a scale or a page
    is wrong (that leaves a few percent)."""
    token_prompts = prompts(12, seed=1)
    base = generate(model_dir, token_prompts, block_size=4)
    for options in ({}, {"calculate_kv_scales": True}):
        fp8 = generate(model_dir, token_prompts, block_size=4, kv_cache_dtype="fp8", **options)
        assert agreement(fp8, base) >= 0.85, options


@torch.inference_mode()
def teacher_forced(llm: LLM, ids: list[int], window: int = 256) -> tuple[float, torch.Tensor]:
    """(mean negative log-likelihood, most likely next token) at every position of `ids`, cut into windows, each
    run as one prefill through the engine's model and pages (every key read back from the pages)."""
    engine = llm.engine
    page = engine.pages.page_size
    n = (len(ids) - 1) // window
    x = torch.tensor(ids[: n * window]).view(n, window)
    y = torch.tensor(ids[1: n * window + 1])
    pages_per_window = -(-window // page)
    table = torch.arange(n * pages_per_window, dtype=torch.int32).view(n, pages_per_window)
    positions = torch.arange(window)
    slots = (table.long()[:, positions // page] * page + positions % page).flatten()
    meta = AttentionMetadata(
        cu_seqlens_q=torch.arange(0, (n + 1) * window, window, dtype=torch.int32),
        seqused_k=torch.full((n,), window, dtype=torch.int32), block_table=table, slot_mapping=slots,
        max_seqlen_q=window, max_seqlen_k=window, backend=engine.runner.backend)
    model = engine.runner.model
    logits = model.logits(model(x.flatten(), positions.repeat(n), meta, engine.runner.kv_caches))
    return torch.nn.functional.cross_entropy(logits, y).item(), logits.argmax(-1)


def test_demo_model_fp8_agrees_with_model_dtype():
    """The trained demo model (float32). On 512 tokens of the standard library's own docstrings, each position's
    greedy token given the true text before it (no divergence after a first difference): measured 98.4% equal with
    scales 1.0 and 96.9% with measured scales, the loss 0.11% and 0.13% higher; floors 93% and 1%, about twice the
    differences measured (the held-out figures, 64 prompts x 64 tokens and 16k tokens, are in docs/benchmarks.md).
    Free-running, greedy texts part ways at their first close call, so the position-by-position count is lower:
    12 prompts x 8 tokens, measured 100% and 84%, floor 60%. A scale left out or applied twice leaves a few percent."""
    import argparse
    import json
    import textwrap

    text = "\n\n".join(m.__doc__ for m in (json, argparse, textwrap, torch.nn.Module))
    ref = LLM(default_model_path())
    ids = ref.engine.tokenizer.encode(text)[:513]
    ref_loss, ref_top = teacher_forced(ref, ids)
    base = [o.outputs[0].token_ids for o in ref.generate(TEXTS, GREEDY, use_tqdm=False)]
    for options in ({}, {"calculate_kv_scales": True}):
        llm = LLM(default_model_path(), kv_cache_dtype="fp8", **options)
        fp8 = [o.outputs[0].token_ids for o in llm.generate(TEXTS, GREEDY, use_tqdm=False)]  # step 1 measures
        loss, top = teacher_forced(llm, ids)
        assert (top == ref_top).float().mean() >= 0.93, options
        assert abs(loss / ref_loss - 1) < 0.01, options
        assert agreement(fp8, base) >= 0.6, options


TEXTS = ["The for statement", "A list comprehension", "Return the number of", "Exceptions", "The with statement",
         "Raise ValueError if", "def main():", "import os", "The default is", "This module provides",
         "Return True if", "If the file"]


def test_prefix_cache_hits_on_fp8_pages(model_dir):
    """Prompts sharing 9 tokens: the later ones take the first's two full pages from the cache, and their tokens
    equal those of the same fp8 run without prefix caching."""
    token_prompts = prompts(4, seed=2, shared=9)
    llm = LLM(str(model_dir), skip_tokenizer_init=True, block_size=4, kv_cache_dtype="fp8")
    first = llm.generate([{"prompt_token_ids": token_prompts[0]}], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    seqs = [llm.engine.add_request(p, GREEDY, str(i))[0] for i, p in enumerate(token_prompts[1:])]
    llm.engine.step()
    assert llm.engine.last_step.num_tokens == sum(len(p) - 8 for p in token_prompts[1:])  # two pages of 4 were hits
    while llm.engine.has_unfinished():
        llm.engine.step()
    hits = [first] + [s.output_ids for s in seqs]
    assert hits == generate(model_dir, token_prompts, block_size=4, kv_cache_dtype="fp8", enable_prefix_caching=False)


def test_preemption_on_fp8_pages(model_dir):
    """A pool too small for the batch: sequences are preempted and recomputed into fp8 pages, and generate the
    tokens of a pool that holds them all."""
    token_prompts = prompts(6, seed=3)
    roomy = generate(model_dir, token_prompts, block_size=4, kv_cache_dtype="fp8")
    llm = LLM(str(model_dir), skip_tokenizer_init=True, block_size=4, kv_cache_dtype="fp8", num_kv_pages=24,
              max_model_len=64)
    outs = llm.generate([{"prompt_token_ids": p} for p in token_prompts], GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == roomy


def test_triton_backend_reads_fp8_pages(model_dir):
    """The unified kernel (Triton's interpreter) on the pages the engine wrote: the reference backend's tokens."""
    token_prompts = prompts(2, seed=7)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    reference = generate(model_dir, token_prompts, params, block_size=4, kv_cache_dtype="fp8",
                         calculate_kv_scales=True)
    triton = generate(model_dir, token_prompts, params, block_size=4, kv_cache_dtype="fp8",
                      calculate_kv_scales=True, attention_backend="triton")
    assert triton == reference
