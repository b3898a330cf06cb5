"""`tritium tune`: search the attention kernel's configurations for the suite's problem classes on the GPU at hand
and cache the winners (the search itself is `tritium.ops.attention.tuning`, shared with the engine's auto-tune)."""

from pathlib import Path

import torch

from tritium.bench.scenarios import load_scenarios, select_scenarios
from tritium.ops.attention.configs import user_cache_path
from tritium.ops.attention.tuning import problem_classes, tune_classes
from tritium.ops.devices import device_key


def tune(
    scenario_names: list[str] | None = None, page_size: int = 16, dtype: torch.dtype = torch.bfloat16,
    cache: Path | None = None,
) -> dict[str, dict]:
    """Tune every problem class of the suite (or of the named scenarios); returns {class: config fields}."""
    if not torch.cuda.is_available():
        raise RuntimeError("tritium tune needs a GPU: the interpreter's timings say nothing about a device")
    classes = problem_classes(select_scenarios(load_scenarios(), scenario_names), page_size)
    winners = tune_classes(classes, page_size, dtype, cache)
    print(f"wrote {len(winners)} tuned configs for {device_key(torch.device('cuda'))} to {cache or user_cache_path()}")
    return winners
