"""Mixtral and Qwen3-MoE against transformers on tiny random folders (float32); the loader's forms of expert
weights; how config.json forms are read."""

import pytest
import torch
from safetensors.torch import save_file

from tests.models.helpers import check_against_transformers, save_family
from tritium.models.config import ModelConfig
from tritium.models.loader import load_model
from tritium.models.shapes import shape_config


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_matches_transformers(family, tmp_path):
    check_against_transformers(family, "reference", tmp_path)


def test_loads_stacked_expert_weights(tmp_path):
    """transformers 5's stacked names (experts.gate_up_proj, experts.down_proj) load as they are; the per-expert
    checkpoint of the same model fills them identically (gate rows first, then up)."""
    hf = save_family("mixtral", tmp_path / "per_expert")
    model = load_model(tmp_path / "per_expert", torch.float32, "cpu")
    theirs = hf.model.layers[1].mlp.experts
    ours = model.model.layers[1].mlp.experts
    assert torch.equal(ours.gate_up_proj, theirs.gate_up_proj) and torch.equal(ours.down_proj, theirs.down_proj)
    stacked = {k: v.contiguous() for k, v in model.state_dict().items() if "cos_sin" not in k}
    (tmp_path / "stacked").mkdir()
    save_file(stacked, str(tmp_path / "stacked" / "model.safetensors"))
    (tmp_path / "stacked" / "config.json").write_text((tmp_path / "per_expert" / "config.json").read_text())
    again = load_model(tmp_path / "stacked", torch.float32, "cpu")
    for (name, p), q in zip(model.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_missing_expert_is_named(tmp_path):
    save_family("qwen3_moe", tmp_path)
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.layers.0.mlp.experts.4.up_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"no weights for model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        load_model(tmp_path, torch.float32, "cpu")


def test_moe_shapes():
    mixtral, qwen = shape_config("mixtral-8x7b"), shape_config("qwen3-30b-a3b")
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.moe_intermediate_size) == (8, 2, 14336)
    assert mixtral.norm_topk_prob and mixtral.layer_windows == (None,) * 32
    assert (qwen.num_experts, qwen.experts_per_token, qwen.moe_intermediate_size) == (128, 8, 768)
    assert qwen.norm_topk_prob and all(qwen.sparse_layers) and qwen.qk_norm


BASE = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 8, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 16}


def test_qwen3_moe_dense_layers():
    cfg = ModelConfig.from_dict({**BASE, "mlp_only_layers": [0], "decoder_sparse_step": 2})
    assert cfg.sparse_layers == (False, True, False, True) and not cfg.norm_topk_prob


@pytest.mark.parametrize("fields, message", [
    ({"num_experts_per_tok": 5}, r"num_experts_per_tok \(5\) exceeds the number of experts \(4\)"),
    ({"num_experts": 0}, "num_experts must be a positive integer"),
    ({"moe_intermediate_size": None}, "moe_intermediate_size must be a positive integer"),
])
def test_moe_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**BASE, **fields})
