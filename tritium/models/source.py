"""Where a model's files are: a local folder, or a Hugging Face Hub id (`org/name`) resolved through
huggingface_hub: the local cache first, then a download unless HF_HUB_OFFLINE=1. Each way of failing has its own
message: no such path, not a model folder, not on the Hub or not cached."""

import re
from pathlib import Path

# What Tritium reads from a Hub repository: configs, tokenizer files, chat templates and safetensors weights; not
# the original checkpoints some repositories carry beside them.
HUB_FILES = ["*.json", "*.jinja", "*.safetensors"]
HUB_SKIPPED = ["original/*", "consolidated*"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model(model: str | Path, revision: str | None = None) -> Path:
    """The folder of a model given as a path or a Hub id; it holds config.json. Raises ValueError saying which of
    "no such path", "not a model folder (config.json missing)" or "not on the Hub / not cached" it is."""
    folder = resolve_folder(model, revision)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{model} is not a model folder: config.json is missing in {folder}")
    return folder


def resolve_folder(name: str | Path, revision: str | None = None) -> Path:
    """A local folder as it is (a revision is for Hub ids only, as in vLLM), or a Hub repository's snapshot folder
    (cached or downloaded)."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{name} is a file, not a model folder")
        return path
    if not _HUB_ID.fullmatch(str(name)):
        raise ValueError(f"no such path: {name} (nor is it a Hugging Face Hub id, org/name)")
    return _hub_snapshot(str(name), revision)


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    at = f" at revision {revision}" if revision else ""
    files = {"allow_patterns": HUB_FILES, "ignore_patterns": HUB_SKIPPED, "revision": revision}
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **files))
    except LocalEntryNotFoundError:
        pass  # not in the cache
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"no such path: {repo_id}, and the Hugging Face model {repo_id}{at} is not in the local "
                         f"cache ({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE=1 forbids downloading it")
    try:
        return Path(snapshot_download(repo_id, **files))
    except RevisionNotFoundError:
        raise ValueError(f"the Hugging Face model {repo_id} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ValueError(f"no such path: {repo_id}, and no model {repo_id} on the Hugging Face Hub (a private or "
                         "gated one needs HF_TOKEN)") from None
    except (LocalEntryNotFoundError, OSError) as exc:  # the Hub could not be reached
        raise ValueError(f"could not download the Hugging Face model {repo_id}{at}: {exc}") from None
