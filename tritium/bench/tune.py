"""`tritium tune`: search the attention kernel's configurations on the GPU at hand and cache the winners.

The suite's scenarios are grouped by problem class (the key `choose_config` looks up); for each class every
candidate is timed on each of its scenarios, and the candidate with the best geometric-mean time relative to
each scenario's fastest wins. Winners are checked against the reference, then merged into the user's cache
under this device's key, which the kernel reads on its next start.
"""

import json
import math
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from tritium.bench.batches import random_paged_batch, reference_sample
from tritium.bench.scenarios import Scenario, load_scenarios, select_scenarios
from tritium.bench.timing import median_ms
from tritium.ops.attention import AttentionConfig, unified_attention
from tritium.ops.attention.configs import (
    default_config,
    device_key,
    multiprocessor_count,
    problem_class,
    user_cache_path,
)

ERROR_BOUND = 2e-2  # bf16/fp16 output against the float32 reference


def candidates(cls: str, group: int, head_dim: int, splits: int) -> list[AttentionConfig]:
    """The tile shapes, warps and pipeline depths worth timing for one problem class (splits held fixed)."""
    large = head_dim > 128
    found = []
    if cls.startswith("decode-"):  # block-table lookahead is tried on the winner only (see tune)
        rows = int(cls.split("-")[1][1:]) * group
        block_m = max(16, 1 << (rows - 1).bit_length())
        for tile_k in (32, 64) if large else (32, 64, 128):
            for warps in (2, 4):
                for stages in (2, 3, 4):
                    found.append(AttentionConfig(block_m, tile_k, splits, warps, stages))
        return found
    # Large-query classes: 128-row tiles on 8 warps are the usual winners; a few smaller shapes check that.
    shapes = [(128, 8, 64, 2), (128, 8, 64, 3), (128, 8, 64, 4), (128, 8, 128, 2), (128, 8, 128, 3),
              (128, 8, 32, 3), (64, 4, 64, 2), (64, 4, 64, 3), (64, 4, 128, 2), (128, 4, 64, 2), (128, 4, 64, 3)]
    if large:
        shapes = [(64, 4, 32, 2), (64, 4, 64, 2), (64, 8, 64, 2), (128, 8, 32, 2), (128, 8, 64, 2)]
    return [AttentionConfig(block_m, tile_k, 1, warps, stages, lookahead)
            for block_m, warps, tile_k, stages in shapes if block_m >= group for lookahead in (0, 1)]


def tune(
    scenario_names: list[str] | None = None, page_size: int = 16, dtype: torch.dtype = torch.bfloat16,
    cache: Path | None = None,
) -> dict[str, dict]:
    """Tune every problem class of the suite (or of the named scenarios); returns {class: config fields}."""
    if not torch.cuda.is_available():
        raise RuntimeError("tritium tune needs a GPU: the interpreter's timings say nothing about a device")
    device = torch.device("cuda")
    scenarios = select_scenarios(load_scenarios(), scenario_names)
    classes: dict[str, list[Scenario]] = defaultdict(list)
    for sc in scenarios:
        tokens = sum(q for q, _ in sc.seqs)
        cls = problem_class(tokens, len(sc.seqs), sc.num_q_heads, sc.num_kv_heads, sc.head_size, page_size)
        classes[cls].append(sc)

    sms = multiprocessor_count(device)
    winners: dict[str, dict] = {}
    for cls, members in tqdm(classes.items(), desc="tuning", unit="class"):
        batches = [random_paged_batch(list(sc.seqs), sc.num_q_heads, sc.num_kv_heads, sc.head_size, page_size,
                                      dtype=dtype, device=device) for sc in members]
        runs = [(b, sc, b.kernel_args(torch.empty_like(b.q), window_size=sc.window_size))
                for b, sc in zip(batches, members)]
        default = _default(batches[0])
        sc0 = members[0]
        best, best_ms = _search(runs, candidates(cls, sc0.num_q_heads // sc0.num_kv_heads, sc0.head_size,
                                                 default.num_splits))
        if cls.startswith("decode-"):
            best, best_ms = _search(runs, [best, replace(best, page_lookahead=1)])
            programs = len(sc0.seqs) * sc0.num_kv_heads
            splits = [s for s in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) if s == 1 or programs * s <= 16 * sms]
            best, best_ms = _search(runs, [replace(best, num_splits=s) for s in splits])
        default_ms = [_time(lambda a=args, c=default: unified_attention(*a, config=c)) for _, _, args in runs]
        for batch, sc, _ in runs:
            _check(batch, sc, best)
        winners[cls] = asdict(best)
        _store(cache or user_cache_path(), device_key(device), {cls: winners[cls]})  # a stopped run keeps its classes
        gain = _geomean([d / t for d, t in zip(default_ms, best_ms)])
        tqdm.write(f"{cls:28s} {best}  {', '.join(f'{t:.4f}' for t in best_ms)} ms "
                   f"({gain:.2f}x the untuned default)")
        del batches, runs
        torch.cuda.empty_cache()

    print(f"wrote {len(winners)} tuned configs for {device_key(device)} to {cache or user_cache_path()}")
    return winners


def _store(path: Path, key: str, winners: dict[str, dict]) -> None:
    stored = json.loads(path.read_text()) if path.is_file() else {}
    stored.setdefault(key, {}).update(winners)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=1, sort_keys=True))


def _search(runs: list, configs: list[AttentionConfig]) -> tuple[AttentionConfig, list[float]]:
    """The config with the best geometric-mean time relative to each run's fastest, and its times."""
    times = {c: [_time(lambda a=args, c=c: unified_attention(*a, config=c)) for _, _, args in runs] for c in configs}
    fastest = [min(t[i] for t in times.values()) for i in range(len(runs))]
    usable = [c for c in configs if all(math.isfinite(t) for t in times[c])]
    if not usable:
        raise RuntimeError(f"no candidate config ran on this device: {configs}")
    best = min(usable, key=lambda c: _geomean([t / f for t, f in zip(times[c], fastest)]))
    return best, times[best]


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _default(batch) -> AttentionConfig:
    q = batch.q
    return default_config(q.device, q.shape[0], batch.seqused_k.numel(), q.shape[1], batch.k_cache.shape[2],
                          q.shape[2])


def _time(fn) -> float:
    try:
        return median_ms(fn, torch.device("cuda"), warmup=5, rep=25)[0]
    except Exception:  # out of shared memory or registers on this device: not a candidate here
        return math.inf


def _check(batch, sc: Scenario, config: AttentionConfig) -> None:
    out = torch.full_like(batch.q, float("nan"))
    unified_attention(*batch.kernel_args(out, window_size=sc.window_size), config=config)
    rows, ref = reference_sample(batch, sc.window_size)
    err = ((out[rows].double() - ref).norm() / ref.norm()).item()
    if not err <= ERROR_BOUND:
        raise RuntimeError(f"{sc.name}: tuned config {config} is off the reference by {err:.2e}")
