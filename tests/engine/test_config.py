"""EngineConfig (tritium/engine/config.py): typed, checked engine settings."""

import pytest
import torch

from tritium.engine.config import EngineConfig


def test_defaults_and_dtype_resolution():
    config = EngineConfig()
    assert (config.block_size, config.max_num_seqs, config.enable_prefix_caching) == (16, 256, True)
    assert config.torch_dtype(torch.device("cpu")) == torch.float32
    assert config.torch_dtype(torch.device("cuda")) == torch.bfloat16
    assert EngineConfig(dtype=torch.float16).dtype == "float16"


@pytest.mark.parametrize("field, value", [
    ("dtype", "float64"), ("block_size", 0), ("block_size", 1.5), ("block_size", True), ("max_num_seqs", -1),
    ("max_model_len", 0), ("num_kv_pages", "8"), ("enable_prefix_caching", 1), ("enforce_eager", "yes"),
    ("gpu_memory_utilization", 0.0), ("gpu_memory_utilization", 1.5), ("attention_backend", "flash"),
    ("tensor_parallel_size", 0), ("tensor_parallel_size", 2.0),
    ("kv_cache_dtype", "fp8_e5m2"), ("kv_cache_dtype", torch.float8_e4m3fn), ("calculate_kv_scales", 1),
])
def test_bad_values_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_from_options_names_unknown_options():
    assert EngineConfig.from_options(block_size=4).block_size == 4
    with pytest.raises(ValueError, match="unknown engine option 'blok_size'"):
        EngineConfig.from_options(blok_size=4)


def test_kv_cache_dtype():
    assert EngineConfig().torch_kv_dtype(torch.bfloat16) == torch.bfloat16
    for name in ("fp8", "fp8_e4m3"):
        assert EngineConfig(kv_cache_dtype=name).torch_kv_dtype(torch.float32) == torch.float8_e4m3fn
    assert EngineConfig(kv_cache_dtype="fp8", calculate_kv_scales=True).calculate_kv_scales
