"""The warm-up compiles the kernel variant of every step shape: each (query tokens, sequences) a step can have
gets a config whose variant is among those warmed, with the shipped H100 table and with derived configs."""

import json

import pytest
import torch

import tritium.ops.attention.configs as configs
from tritium.engine.warm_up import attention_variants, step_shapes, variant

H100 = "nvidia:NVIDIA H100 80GB HBM3:cc90:sm132"


@pytest.mark.parametrize("table", ["derived", "h100"])
@pytest.mark.parametrize("heads", [(32, 8, 128), (16, 8, 64), (28, 4, 128)])
def test_every_step_shape_gets_a_warmed_variant(table, heads, monkeypatch):
    if table == "h100":  # the shipped H100 table, looked up from the CPU
        monkeypatch.setattr(configs, "device_key", lambda device: H100)
        monkeypatch.setattr(configs, "multiprocessor_count", lambda device: 132)
        assert configs.load_tables()[H100]
    configs.reload_tables()
    max_tokens, max_seqs, cpu = 600, 40, torch.device("cpu")
    warmed = set(attention_variants(cpu, max_tokens, max_seqs, *heads, 16))
    assert len(warmed) == len(attention_variants(cpu, max_tokens, max_seqs, *heads, 16))  # distinct
    for s in range(1, max_seqs + 1):
        for t in range(s, max_tokens + 1):
            config = configs.choose_config(cpu, t, s, *heads, 16)
            assert variant(config) in warmed, (t, s, config)
    configs.reload_tables()


def test_step_shapes_fit_the_budget():
    shapes = step_shapes(64, 4)
    assert (1, 1) in shapes and (4, 4) in shapes and (36, 4) in shapes
    assert all(s <= t <= 64 and 1 <= s <= 4 for t, s in shapes)
    assert (257, 1) not in shapes  # no prefill class under a 64-token budget


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_no_step_compiles_after_the_warm_up(kv_cache_dtype):
    from tritium.engine.config import EngineConfig
    from tritium.engine.llm_engine import LLMEngine
    from tritium.engine.sampling_params import SamplingParams
    from tritium.models.shapes import shape_config
    from tritium.ops.attention import kernel

    def compiled() -> int:
        return sum(len(cache[0]) for fn in (kernel.unified_attention_kernel, kernel.merge_splits_kernel)
                   for cache in fn.device_caches.values())

    config = EngineConfig(skip_tokenizer_init=True, max_model_len=2048, max_num_seqs=8, max_num_batched_tokens=512,
                          gpu_memory_utilization=0.3, kv_cache_dtype=kv_cache_dtype)
    engine = LLMEngine(shape_config("llama-3.2-1b"), config)
    before = compiled()
    g = torch.Generator().manual_seed(0)
    # Prefills, a chunked one, mixed steps and decodes at several batch sizes; tables of 1 to 38 pages.
    for n in (3, 40, 300, 600, 17, 90, 5, 250):
        engine.add_request(torch.randint(0, 1000, (n,), generator=g).tolist(),
                           SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        engine.step()
    while engine.has_unfinished():
        engine.step()
    assert compiled() == before


def test_every_token_count_gets_a_warmed_moe_config(tmp_path, monkeypatch):
    """Whatever a step's token count, its MoE layer's config is among those warmed (tuned entries at a few counts,
    the rest borrowed from the nearest)."""
    from tritium.engine.warm_up import moe_variants
    from tritium.ops.moe import configs as moe_configs
    from tritium.ops.moe.configs import GemmConfig, MoEConfig

    def entry(block_m: int) -> dict:
        return MoEConfig(GemmConfig(block_m, 64, 64), GemmConfig(block_m, 32, 64)).to_dict()

    shape = "moe-e8-k2-h64-i96"
    monkeypatch.setenv("TRITIUM_CACHE_DIR", str(tmp_path))
    (tmp_path / "moe_configs.json").write_text(json.dumps({"cpu": {f"{shape}-t1": entry(16), f"{shape}-t64": entry(32),
                                                                   f"{shape}-t512": entry(128)}}))
    moe_configs.reload_tables()
    cpu = torch.device("cpu")
    warmed = moe_variants(cpu, 600, 8, 2, 64, 96)
    assert len(warmed) == 3
    for t in range(1, 601):
        assert moe_configs.choose_config(cpu, t, 8, 2, 64, 96) in warmed, t
    moe_configs.reload_tables()
