"""On a GPU: the engine on random bf16 weights of Gemma-2- and MoE-shaped models (the real layers' shapes, fewer
layers): decode steps replayed from CUDA graphs give eager steps' greedy tokens, and after the start-up compile no
step compiles an attention or MoE kernel (Gemma's sliding and global layers, soft-capped, are two kinds of
attention layer; a MoE layer's configs vary with the token count)."""

import pytest
import torch

from tritium.engine.config import EngineConfig
from tritium.engine.llm_engine import LLMEngine
from tritium.engine.sampling_params import SamplingParams
from tritium.models.config import ModelConfig
from tritium.models.shapes import MODEL_SHAPES
from tritium.ops.attention import kernel as attention_kernel
from tritium.ops.moe import kernel as moe_kernel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

GEMMA2 = {"architectures": ["Gemma2ForCausalLM"], "vocab_size": 256000, "hidden_size": 3584,
          "intermediate_size": 14336, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
          "query_pre_attn_scalar": 256, "sliding_window": 64, "attn_logit_softcapping": 50.0,
          "final_logit_softcapping": 30.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6}
MODELS = {
    "gemma2": {**GEMMA2, "num_hidden_layers": 2},
    "mixtral": {**MODEL_SHAPES["mixtral-8x7b"], "num_hidden_layers": 1},
    "qwen3_moe": {**MODEL_SHAPES["qwen3-30b-a3b"], "num_hidden_layers": 2},
}
KERNELS = (attention_kernel.unified_attention_kernel, attention_kernel.merge_splits_kernel, moe_kernel.count_kernel,
           moe_kernel.scatter_kernel, moe_kernel.gate_up_kernel, moe_kernel.down_kernel, moe_kernel.combine_kernel)


def compiled() -> int:
    return sum(len(cache[0]) for fn in KERNELS for cache in fn.device_caches.values())


def generate(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    seqs = [engine.add_request(p, params, str(i))[0] for i, p in enumerate(prompts)]
    while engine.has_unfinished():
        engine.step()
    return [s.output_ids for s in seqs]


@pytest.mark.parametrize("name", list(MODELS))
def test_graphs_equal_eager_and_no_compile_after_warm_up(name):
    config = EngineConfig(skip_tokenizer_init=True, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=512,
                          gpu_memory_utilization=0.3, enable_prefix_caching=False, auto_tune=False)
    engine = LLMEngine(ModelConfig.from_dict({**MODELS[name], "torch_dtype": "bfloat16"}), config)
    assert engine.runner.graphs is not None
    before = compiled()
    g = torch.Generator().manual_seed(0)
    # Prompts past the 64-key window, a chunked one (600 > 512), batches of 1 and 8 (graph buckets).
    prompts = [torch.randint(0, 1000, (int(n),), generator=g).tolist() for n in (600, 90, 5, 250, 130, 17, 70, 200)]
    with_graphs = generate(engine, prompts) + generate(engine, prompts[:1])
    assert compiled() == before
    graphs, engine.runner.graphs = engine.runner.graphs, None
    eager = generate(engine, prompts) + generate(engine, prompts[:1])
    engine.runner.graphs = graphs
    assert with_graphs == eager
    del engine
    torch.cuda.empty_cache()
