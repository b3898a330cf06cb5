"""`tritium tune`: search the attention kernel's configurations for the suite's problem classes on the GPU at hand
and cache the winners (the search itself is `tritium.ops.attention.tuning`, shared with the engine's auto-tune);
`--op moe`, the fused-MoE kernels' for the MoE model shapes' layers (`tritium.ops.moe.tuning`)."""

from pathlib import Path

import torch

from tritium.bench.moe import moe_shapes
from tritium.bench.scenarios import load_scenarios, select_scenarios
from tritium.ops.attention.configs import user_cache_path
from tritium.ops.attention.tuning import problem_classes, tune_classes
from tritium.ops.devices import device_key
from tritium.ops.moe import configs as moe_configs
from tritium.ops.moe.tuning import TOKENS, tune_shapes


def tune(
    scenario_names: list[str] | None = None, page_size: int = 16, dtype: torch.dtype = torch.bfloat16,
    cache: Path | None = None, kv_fp8: bool = False,
) -> dict[str, dict]:
    """Tune every problem class of the suite (or of the named scenarios), over fp8 K/V pages with `kv_fp8`;
    returns {class: config fields}."""
    if not torch.cuda.is_available():
        raise RuntimeError("tritium tune needs a GPU: the interpreter's timings say nothing about a device")
    classes = problem_classes(select_scenarios(load_scenarios(), scenario_names), page_size, kv_fp8)
    winners = tune_classes(classes, page_size, dtype, cache)
    print(f"wrote {len(winners)} tuned configs for {device_key(torch.device('cuda'))} to {cache or user_cache_path()}")
    return winners


def tune_moe(shape_names: list[str] | None = None, tokens: list[int] | None = None,
             dtype: torch.dtype = torch.bfloat16, cache: Path | None = None) -> dict[str, dict]:
    """Tune the MoE layer of every MoE model shape (or of the named ones) at each token count (default 1, 2, 4 ..
    4096); returns {class: config fields}."""
    known = moe_shapes()
    unknown = [n for n in shape_names or () if n not in known]
    if unknown:
        raise ValueError(f"unknown MoE shape {', '.join(unknown)}; known: {', '.join(known)}")
    if not torch.cuda.is_available():
        raise RuntimeError("tritium tune needs a GPU: the interpreter's timings say nothing about a device")
    winners = tune_shapes([known[n] for n in shape_names or known], list(tokens or TOKENS), dtype, cache)
    print(f"wrote {len(winners)} tuned MoE configs for {device_key(torch.device('cuda'))} to "
          f"{cache or moe_configs.user_cache_path()}")
    return winners
