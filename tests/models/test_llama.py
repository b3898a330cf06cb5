"""The Llama-like model against Hugging Face transformers on the same random weights, in float32 (the comparison is
`check_against_transformers` in helpers.py); config.json and loader errors."""

import pytest
import torch

from tests.models.helpers import check_against_transformers, save_family
from tritium.models.config import ModelConfig
from tritium.models.loader import load_model

# Every family on the quick reference backend; the Triton kernel (in the interpreter here) on two of them.
CASES = [(f, "reference") for f in ("llama3", "mistral", "qwen2", "qwen3")] + [("llama3", "triton"),
                                                                              ("mistral", "triton")]


@pytest.mark.parametrize("family,backend", CASES)
def test_matches_transformers(family, backend, tmp_path):
    check_against_transformers(family, backend, tmp_path)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        ModelConfig.load(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_dict({"architectures": ["GPT2LMHeadModel"]})
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.from_dict({**base, "num_key_value_heads": 3, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_dict({**base, "hidden_size": 0})
    with pytest.raises(ValueError, match="rope type"):
        ModelConfig.from_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_loader_errors(tmp_path):
    save_family("qwen2", tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "renamed.bin")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_model(tmp_path, torch.float32, "cpu")
