"""scripts/train_demo_model.py on a CPU: a tiny smoke run whose folder Tritium and transformers both load and agree
on, and the demo size's budget (at most 15M parameters, 30 MB of weights)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers

from tests.engine.helpers import assert_greedy_equals_transformers

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_demo_model.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report = load_script().main(["--size", "tiny", "--steps", "40", "--batch-size", "8", "--seq-len", "64",
                                 "--max-docs", "120", "--out", str(out)])
    return out, report


def test_smoke_run_learns_and_writes_a_model_folder(trained):
    out, report = trained
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert report["final_loss"] < report["first_loss"] - 0.5
    assert 1 < report["held_out_perplexity"] < json.loads((out / "config.json").read_text())["vocab_size"]
    assert f"held_out_perplexity: {report['held_out_perplexity']}" in (out / "README.md").read_text()


def test_tritium_greedy_equals_transformers_on_the_trained_folder(trained):
    assert_greedy_equals_transformers(trained[0], ["The for statement", "Return the"], max_tokens=8)


def test_training_model_logits_equal_transformers(trained):
    out, _ = trained
    script = load_script()
    config = json.loads((out / "config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = script.TrainingLlama(config)
    ours.load_state_dict({k: v.float() for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    ids = torch.randint(0, config["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_demo_size_fits_the_budget():
    script = load_script()
    config = {**script.SIZES["demo"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    params = sum(p.numel() for p in script.TrainingLlama(config).parameters())
    assert params <= 15_000_000 and params * 2 <= 30 * 2**20  # bf16 weights
