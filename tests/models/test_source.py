"""Models by path or Hugging Face Hub id (tritium/models/source.py) against a pre-populated local Hub cache, with no
network: each way of failing has its own message, and a cached model runs through LLM and the CLI."""

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError

from tritium import LLM, SamplingParams, default_model_path
from tritium.cli import main
from tritium.models.source import HUB_FILES, resolve_model

REPO = "tritium-test/demo"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """A Hub cache holding REPO at COMMIT (branch main) as huggingface_hub lays it out; offline. Returns the
    snapshot folder."""
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in Path(default_model_path()).iterdir():
        if f.suffix in (".json", ".safetensors"):
            (snapshot / f.name).symlink_to(f)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_a_cached_hub_id_resolves_to_its_snapshot(hub):
    assert resolve_model(REPO) == hub
    assert resolve_model(REPO, revision=COMMIT) == hub
    assert resolve_model(default_model_path()) == Path(default_model_path())  # a folder is taken as it is


def test_a_cached_hub_id_generates_as_its_folder_does(hub, capsys):
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    by_id = LLM(REPO, revision=COMMIT, max_model_len=64).generate("The for statement", greedy, use_tqdm=False)
    by_path = LLM(max_model_len=64).generate("The for statement", greedy, use_tqdm=False)
    assert by_id[0].outputs[0].token_ids == by_path[0].outputs[0].token_ids
    assert main(["generate", "--model", REPO, "--temperature", "0", "--max-tokens", "6", "--ignore-eos",
                 "--max-model-len", "64", "The for statement"]) == 0
    assert capsys.readouterr().out == "The for statement" + by_path[0].outputs[0].text + "\n"


@pytest.mark.parametrize(("model", "revision", "message"), [
    ("/no/such/folder", None, "no such path: /no/such/folder (nor is it a Hugging Face Hub id"),
    ("tritium-test/absent", None, "the Hugging Face model tritium-test/absent is not in the local cache"),
    (REPO, "v9", "the Hugging Face model tritium-test/demo at revision v9 is not in the local cache"),
])
def test_missing_models_are_told_apart(hub, model, revision, message):
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1 forbids" if "/no/" not in model else "no such path") as e:
        resolve_model(model, revision)
    assert message in str(e.value)


def test_a_file_or_a_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.safetensors is a file, not a model folder"):
        resolve_model(tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="is not a model folder: config.json is missing"):
        LLM(str(tmp_path))


def test_unsupported_architecture_and_missing_tokenizer(tmp_path, capsys):
    shutil.copytree(default_model_path(), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer missing: .*m has no tokenizer.json"):
        LLM(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"unsupported architecture GPT2LMHeadModel \(supported: LlamaForCausalLM, "):
        LLM(str(tmp_path / "m"))  # the architecture is checked before the tokenizer
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(tmp_path / "m"), "hello"])
    assert exit_info.value.code == 2
    assert "tritium generate: unsupported architecture GPT2LMHeadModel" in capsys.readouterr().err


def test_an_uncached_model_is_downloaded_unless_offline(hub, monkeypatch):
    calls = []

    def snapshot_download(repo_id, local_files_only=False, **kwargs):
        calls.append((repo_id, local_files_only, kwargs))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(hub)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert resolve_model("org/elsewhere", revision="v1") == hub
    assert [(c[0], c[1]) for c in calls] == [("org/elsewhere", True), ("org/elsewhere", False)]  # the cache first
    assert calls[1][2]["revision"] == "v1" and calls[1][2]["allow_patterns"] == HUB_FILES
