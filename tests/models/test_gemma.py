"""Gemma 2 and Gemma 3 (text) against transformers on tiny random folders (float32): sliding windows shorter than
the prompts, soft-caps that bite, Gemma 3's two RoPE bases and linear scaling; how config.json forms are read."""

import pytest

from tests.models.helpers import check_against_transformers
from tritium.models.config import ModelConfig


# The reference backend here; the kernel's windows and soft-caps are tested in tests/ops, and every family runs
# through the kernels on a GPU in test_families_gpu.py.
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_matches_transformers(family, tmp_path):
    check_against_transformers(family, "reference", tmp_path)


BASE = {"vocab_size": 8, "hidden_size": 32, "intermediate_size": 8, "num_attention_heads": 2, "head_dim": 16}


def test_gemma2_hub_config():
    """A Gemma 2 config.json as on the Hub (no layer_types): sliding layers alternate from layer 0; softcaps."""
    cfg = ModelConfig.from_dict({**BASE, "architectures": ["Gemma2ForCausalLM"], "num_hidden_layers": 4,
                                 "sliding_window": 4096, "query_pre_attn_scalar": 144,
                                 "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
                                 "attn_logit_softcapping": 50.0,
                                 "final_logit_softcapping": 30.0, "rope_theta": 10000.0})
    assert cfg.layer_windows == (4096, None, 4096, None)
    assert (cfg.attn_softcap, cfg.final_softcap, cfg.attention_scale) == (50.0, 30.0, 144**-0.5)
    assert cfg.norm_unit_offset and cfg.tie_word_embeddings and cfg.hidden_act == "gelu_pytorch_tanh"
    assert cfg.local_rope_theta is None and not cfg.qk_norm


def test_gemma3_hub_config():
    """A Gemma 3 config.json as on the Hub (before transformers 5): the 5:1 pattern, a local RoPE base, the
    global layers' linear scaling; no soft-caps."""
    cfg = ModelConfig.from_dict({**BASE, "architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 7,
                                 "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
                                 "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                                 "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                                 "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert cfg.layer_windows == (512,) * 5 + (None, 512)
    assert (cfg.rope_theta, cfg.local_rope_theta, cfg.rope_scaling["factor"]) == (1e6, 1e4, 8.0)
    assert (cfg.attn_softcap, cfg.final_softcap) == (0.0, 0.0) and cfg.qk_norm


@pytest.mark.parametrize("fields, message", [
    ({"layer_types": ["sliding_attention"]}, "layer_types must name"),
    ({"layer_types": ["sliding_attention", "local"]}, "layer_types must name"),
    ({"sliding_window": None}, "sliding layers need a positive sliding_window"),
    ({"hidden_activation": "relu"}, "activation 'relu' is not supported"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention is not supported"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"},
                          "sliding_attention": {"rope_type": "yarn", "factor": 2.0}}}, "sliding layers' rope type"),
])
def test_gemma_config_errors(fields, message):
    raw = {**BASE, "architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 2, "sliding_window": 4, **fields}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(raw)
