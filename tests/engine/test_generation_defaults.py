"""A model folder's generation_config.json sets the sampling defaults (as vLLM reads it): LLM calls without
SamplingParams, `tritium generate` options left unset, and server requests that leave the fields out."""

import json
import shutil

import pytest

from tritium import LLM, SamplingParams
from tritium.cli import main
from tritium.server.protocol import CompletionRequest


@pytest.fixture(scope="module")
def greedy_folder(text_model, tmp_path_factory):
    """The text model with generation_config.json asking for greedy decoding of 7 tokens."""
    path = tmp_path_factory.mktemp("greedy_defaults")
    shutil.copytree(text_model[0], path, dirs_exist_ok=True)
    (path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 299, "do_sample": True, "temperature": 0.0, "top_p": 0.5, "max_new_tokens": 7}))
    return path


def test_llm_without_params_uses_the_folder_defaults(greedy_folder):
    llm = LLM(str(greedy_folder), dtype="float32")
    assert llm.default_sampling_params() == SamplingParams(temperature=0.0, top_p=0.5, max_tokens=7)
    assert llm.default_sampling_params(temperature=0.9).temperature == 0.9
    prompts = ["The for statement", "Return the"]
    default = llm.generate(prompts, use_tqdm=False)
    explicit = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=7, ignore_eos=False), use_tqdm=False)
    for a, b in zip(default, explicit, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert 1 <= len(a.outputs[0].token_ids) <= 7
    assert "".join(llm.stream("Return the")) == default[1].outputs[0].text


def test_cli_options_override_the_folder_defaults(greedy_folder, capsys):
    llm = LLM(str(greedy_folder), dtype="float32")
    greedy = llm.generate(["Return the"], use_tqdm=False)[0].outputs[0].text
    assert main(["generate", "--model", str(greedy_folder), "--dtype", "float32", "Return the"]) == 0
    assert capsys.readouterr().out == "Return the" + greedy + "\n"
    sampled = llm.generate(["Return the"], SamplingParams(temperature=1.0, seed=3, max_tokens=12, top_p=0.5),
                           use_tqdm=False)[0].outputs[0].text
    assert main(["generate", "--model", str(greedy_folder), "--dtype", "float32", "--temperature", "1",
                 "--seed", "3", "--max-tokens", "12", "Return the"]) == 0
    assert capsys.readouterr().out == "Return the" + sampled + "\n"


def test_bad_folder_default_is_named(greedy_folder, tmp_path):
    shutil.copytree(greedy_folder, tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1.0}))
    with pytest.raises(ValueError, match="generation_config.json: temperature must be a finite number >= 0"):
        LLM(str(tmp_path), dtype="float32")


def test_server_request_fields_override_model_defaults():
    defaults = {"temperature": 0.0, "top_p": 0.5, "top_k": 7}
    unset = CompletionRequest(model="m", prompt="hi").sampling_params(16, None, defaults)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.min_p) == (0.0, 0.5, 7, 0.0)
    given = CompletionRequest(model="m", prompt="hi", temperature=1.0, top_k=-1).sampling_params(16, None, defaults)
    assert (given.temperature, given.top_p, given.top_k) == (1.0, 0.5, 0)
    assert CompletionRequest(model="m", prompt="hi").sampling_params(16, None, {}) == SamplingParams(max_tokens=16)
