"""What a benchmark result must carry to be read later: card, software versions, date, commit."""

import datetime
import os
import platform
import subprocess

import torch
import triton


def describe_environment(device: torch.device) -> dict[str, str]:
    """Card, versions, UTC time and the commit: $TRITIUM_COMMIT where set (a tree copied to a GPU machine, whose
    .git, if any, is not its own), else the working tree's (marked when it has local changes)."""
    commit = os.environ.get("TRITIUM_COMMIT") or _git_commit()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    return {
        "card": card,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
    }


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+local-changes" if dirty else "")
