"""The search behind `tritium tune` and the engine's auto-tune: time candidate configurations of the attention
kernel for each problem class on the GPU at hand, check the winners against the reference, cache them.

For each class every candidate is timed on each of its problems, and the candidate with the best geometric-mean
time relative to each problem's fastest wins. Compiling dominates a serial run, so every class's candidates are
first compiled by parallel worker processes into Triton's on-disk cache, which the timing loop then loads from.
"""

import json
import math
import multiprocessing
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tritium.ops.attention.batches import PagedBatch, random_paged_batch, reference_sample
from tritium.ops.attention.configs import (
    AttentionConfig,
    class_fields,
    default_config,
    has_tma,
    multiprocessor_count,
    problem_class,
    reload_tables,
    user_cache_path,
)
from tritium.ops.attention.unified import unified_attention, window_size
from tritium.ops.devices import device_key
from tritium.ops.kv_cache import FP8_KV_DTYPE
from tritium.ops.timing import median_ms


@dataclass(frozen=True)
class Problem:
    """One attention call to tune on: sequences as (query_len, context_len) pairs, context counting the new tokens."""

    name: str
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    seqs: tuple[tuple[int, int], ...]
    sliding_window: int | None = None

    @property
    def window_size(self) -> tuple[int, int]:
        """FlashAttention's (left, right): a window of W keys is (W - 1, 0)."""
        return window_size(self.sliding_window)


ERROR_BOUND = 2e-2  # bf16/fp16 output against the float32 reference
CONFIGS_PER_JOB = 4  # small jobs keep every compiling worker busy to the end
MAX_COMPILE_WORKERS = 16  # each holds a CUDA context on the one GPU
# Decode classes try the block-table lookahead on this many of the first search's best. Tried on the first alone,
# the H100 tune at 76c97b9 picked 128-key tiles for decode b1 (1.10x FA3 in its run), where 64-key tiles with the
# lookahead, found by a sweep, measured 1.15x.
LOOKAHEAD_TRIES = 3


@dataclass(frozen=True)
class CompileJob:
    """Some of one class's candidates, and the problems whose kernel specialisations a worker compiles them for."""

    members: tuple[Problem, ...]
    configs: tuple[AttentionConfig, ...]
    page_size: int
    dtype: torch.dtype
    device: str
    kv_dtype: torch.dtype | None = None  # the pages' dtype where it is not `dtype` (fp8)


def candidates(cls: str, group: int, head_dim: int, splits: int, tma: bool = False) -> list[AttentionConfig]:
    """The tile shapes, warps and pipeline depths worth timing for one problem class (splits held fixed); with
    `tma` (the device has it), large-query shapes whose tile fits the class's page also with tensor descriptors."""
    large = head_dim > 128
    fields = class_fields(cls)
    found = []
    if cls.startswith("decode-"):  # block-table lookahead is tried on the best few only (see tune)
        rows = int(fields["q"]) * group
        block_m = max(16, 1 << (rows - 1).bit_length())
        for tile_k in (32, 64) if large else (32, 64, 128):
            for warps in (2, 4):
                for stages in (1, 2, 3, 4):  # 1: no software pipeline, often best for short key ranges
                    found.append(AttentionConfig(block_m, tile_k, splits, warps, stages))
        return found
    # Large-query classes: 128-row tiles on 8 warps are the usual winners; a few smaller shapes check that.
    shapes = [(128, 8, 64, 2), (128, 8, 64, 3), (128, 8, 64, 4), (128, 8, 128, 2), (128, 8, 128, 3),
              (128, 8, 32, 3), (64, 4, 64, 2), (64, 4, 64, 3), (64, 4, 128, 2), (128, 4, 64, 2), (128, 4, 64, 3)]
    if large:
        shapes = [(64, 4, 32, 2), (64, 4, 64, 2), (64, 8, 64, 2), (128, 8, 32, 2), (128, 8, 64, 2)]
    page_size = int(fields["page"])
    return [AttentionConfig(block_m, tile_k, 1, warps, stages, lookahead, descriptors)
            for block_m, warps, tile_k, stages in shapes if block_m >= group for lookahead in (0, 1)
            for descriptors in ((0, 1) if tma and page_size % tile_k == 0 else (0,))]


def tune_classes(
    classes: dict[str, list[Problem]], page_size: int, dtype: torch.dtype, cache: Path | None = None,
    budget_s: float | None = None, clock: Callable[[], float] | None = None, desc: str = "tuning",
    workers: bool = True,
) -> dict[str, dict]:
    """Tune each class on its problems, in order, and merge each winner into the user cache (`cache`, default the one
    the kernel reads) as soon as it is found; K/V pages in fp8 for `-fp8` classes, else in `dtype`.
    With `budget_s`, no class is started once that many seconds have passed since the call (by `clock`, default
    time.monotonic), and compiling ahead stops at the budget too; the classes left keep the configs they had.
    With `workers` False nothing is compiled ahead in worker processes. Returns {class: config fields} of the
    tuned ones."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    clock = clock or time.monotonic
    start = clock()
    left = (lambda: budget_s - (clock() - start)) if budget_s is not None else (lambda: math.inf)
    if device.type == "cuda" and workers:
        precompile(compile_jobs(classes, page_size, dtype, device), timeout_s=left())
    path = cache or user_cache_path()
    sms = multiprocessor_count(device)
    winners: dict[str, dict] = {}
    for cls, members in tqdm(classes.items(), desc=desc, unit="class"):
        if left() <= 0:
            tqdm.write(f"{desc}: time budget of {budget_s:.0f} s spent; {len(classes) - len(winners)} classes left "
                       "untuned (they keep their current configs)")
            break
        runs = _runs(members, page_size, dtype, device, pages_dtype(cls))
        default = _default(members[0], device, pages_dtype(cls) is not None)
        top, best_ms = _search(runs, first_candidates(cls, members, device), keep=LOOKAHEAD_TRIES)
        best = top[0]
        if cls.startswith("decode-"):
            (best,), best_ms = _search(runs, [c for t in top for c in (t, replace(t, page_lookahead=1))])
            p0 = members[0]
            programs = len(p0.seqs) * p0.num_kv_heads
            splits = [s for s in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) if s == 1 or programs * s <= 16 * sms]
            (best,), best_ms = _search(runs, [replace(best, num_splits=s) for s in splits])
        default_ms = [_time(lambda a=args, c=default: unified_attention(*a, config=c)) for _, _, args in runs]
        for batch, p, _ in runs:
            _check(batch, p, best)
        winners[cls] = asdict(best)
        store(path, device_key(device), {cls: winners[cls]})  # a stopped run keeps its classes
        gain = _geomean([d / t for d, t in zip(default_ms, best_ms)])
        tqdm.write(f"{cls:28s} {best}  {', '.join(f'{t:.4f}' for t in best_ms)} ms "
                   f"({gain:.2f}x the untuned default)")
        del runs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    reload_tables()
    return winners


def problem_classes(problems: list[Problem], page_size: int, kv_fp8: bool = False) -> dict[str, list[Problem]]:
    """The problems grouped by problem class (over fp8 K/V pages with `kv_fp8`), in their order."""
    classes: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        tokens = sum(q for q, _ in p.seqs)
        cls = problem_class(tokens, len(p.seqs), p.num_q_heads, p.num_kv_heads, p.head_size, page_size, kv_fp8)
        classes[cls].append(p)
    return classes


def pages_dtype(cls: str) -> torch.dtype | None:
    """The K/V pages' dtype a class is tuned on where it is not the query's: fp8 for `-fp8` classes."""
    return FP8_KV_DTYPE if class_fields(cls)["fp8"] else None


def first_candidates(cls: str, members: list[Problem], device: torch.device) -> list[AttentionConfig]:
    """The candidates the search times first for a class: what is precompiled, and what decode classes'
    lookahead and split searches then vary."""
    sc0 = members[0]
    default = _default(sc0, device, pages_dtype(cls) is not None)
    return candidates(cls, sc0.num_q_heads // sc0.num_kv_heads, sc0.head_size, default.num_splits, has_tma(device))


def compile_jobs(
    classes: dict[str, list[Problem]], page_size: int, dtype: torch.dtype, device: torch.device,
) -> list[CompileJob]:
    """Every class's first candidates in jobs of CONFIGS_PER_JOB, ordered chunk by chunk across the classes, so
    that every class has its first configs compiled early."""
    ranked = []
    for cls, members in classes.items():
        configs = first_candidates(cls, members, device)
        for rank, start in enumerate(range(0, len(configs), CONFIGS_PER_JOB)):
            chunk = tuple(configs[start : start + CONFIGS_PER_JOB])
            ranked.append((rank, CompileJob(tuple(members), chunk, page_size, dtype, str(device),
                                            pages_dtype(cls))))
    return [job for _, job in sorted(ranked, key=lambda r: r[0])]


def precompile(jobs: list, timeout_s: float = math.inf, compile_fn: Callable[[Any], int] | None = None) -> None:
    """Run `compile_fn` (default `compile_job`; it returns how many of a job's `configs` launched) on the jobs in
    parallel processes, so that the timing loop finds their kernels in Triton's on-disk cache.

    Only a head start: a job that fails, or a pool that does, is a warning, and the timing loop compiles the rest.
    After `timeout_s` the jobs not yet started are dropped (those running finish).
    """
    if not jobs or timeout_s <= 0:
        return
    workers = min(os.cpu_count() or 1, len(jobs), MAX_COMPILE_WORKERS)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    failed = []
    try:
        with tqdm(total=sum(len(job.configs) for job in jobs), desc="compiling", unit="config") as bar:
            sizes = {pool.submit(compile_fn or compile_job, job): len(job.configs) for job in jobs}
            skipped = 0
            for done in as_completed(sizes, timeout=None if math.isinf(timeout_s) else timeout_s):
                bar.update(sizes[done])
                if done.exception() is None:
                    skipped += sizes[done] - done.result()
                    bar.set_postfix(skipped=skipped)
                else:  # out of memory for the batches, say, or a crashed worker (which fails every job left)
                    failed.append(done.exception())
    except TimeoutError:
        warnings.warn(f"precompiling stopped at its {timeout_s:.0f} s budget; the timing loop compiles the rest",
                      stacklevel=2)
    except Exception as exc:  # no worker could start, for one
        warnings.warn(f"precompiling stopped ({exc!r}); the timing loop compiles the kernels", stacklevel=2)
    finally:
        pool.shutdown(cancel_futures=True)  # after Ctrl-C or the budget, queued jobs are dropped
    if failed:
        warnings.warn(f"{len(failed)} of {len(jobs)} compile jobs failed (the first: {failed[0]!r}); the timing loop "
                      "compiles their kernels", stacklevel=2)


def compile_job(job: CompileJob) -> int:
    """Launch each config of the job once per member problem, on a one-token batch that compiles the problem's
    kernel specialisation (`compile_args`); returns how many configs launched."""
    launches = [compile_args(p, job.page_size, job.dtype, job.device, job.kv_dtype) for p in job.members]
    launched = 0
    for config in job.configs:
        try:
            for args in launches:
                unified_attention(*args, config=config)
        except Exception:  # does not fit this device: not a candidate here, as _time decides too
            continue
        launched += 1
    return launched


def compile_args(p: Problem, page_size: int, dtype: torch.dtype, device: str | torch.device,
                 kv_dtype: torch.dtype | None = None) -> tuple:
    """`unified_attention`'s arguments for one query token that Triton specialises as it does the problem's own
    launch: the same heads, head size, page size, dtype and window, and a block table whose row stride is, like
    the problem's, 1, a multiple of 16 or neither. Compiling then needs no full-size batch (decode b32 at 32k
    context is 4.3 GB, and up to 16 workers compile at once)."""
    width = max(-(-ctx // page_size) for _, ctx in p.seqs)
    batch = random_paged_batch([(1, 1)], p.num_q_heads, p.num_kv_heads, p.head_size, page_size, dtype=dtype,
                               device=device, kv_dtype=kv_dtype)
    table = torch.zeros(1, _same_specialisation(width), dtype=torch.int32, device=batch.q.device)
    table[0, 0] = batch.block_table[0, 0]  # the one page that holds a key
    batch.block_table = table
    return batch.kernel_args(torch.empty_like(batch.q), window_size=p.window_size)


def _same_specialisation(stride: int) -> int:
    """A small integer that Triton specialises as it does `stride`: equal to 1, divisible by 16, or neither."""
    return stride if stride < 32 else 16 if stride % 16 == 0 else 17


def store(path: Path, key: str, winners: dict[str, dict]) -> None:
    """Merge winners into the JSON cache at `path` under a device key."""
    stored = json.loads(path.read_text()) if path.is_file() else {}
    stored.setdefault(key, {}).update(winners)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=1, sort_keys=True))


def _search(runs: list, configs: list[AttentionConfig], keep: int = 1) -> tuple[list[AttentionConfig], list[float]]:
    """The `keep` configs with the best geometric-mean time relative to each run's fastest, best first, and the
    best one's times."""
    times = {c: [_time(lambda a=args, c=c: unified_attention(*a, config=c)) for _, _, args in runs] for c in configs}
    fastest = [min(t[i] for t in times.values()) for i in range(len(runs))]
    usable = [c for c in configs if all(math.isfinite(t) for t in times[c])]
    if not usable:
        raise RuntimeError(f"no candidate config ran on this device: {configs}")
    ranked = sorted(usable, key=lambda c: _geomean([t / f for t, f in zip(times[c], fastest)]))
    return ranked[:keep], times[ranked[0]]


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _runs(
    members: list[Problem], page_size: int, dtype: torch.dtype, device: str | torch.device,
    kv_dtype: torch.dtype | None = None,
) -> list[tuple[PagedBatch, Problem, tuple]]:
    """Each problem's batch, with the arguments of the timed launches on it."""
    runs = []
    for p in members:
        batch = random_paged_batch(list(p.seqs), p.num_q_heads, p.num_kv_heads, p.head_size, page_size,
                                   dtype=dtype, device=device, kv_dtype=kv_dtype)
        runs.append((batch, p, batch.kernel_args(torch.empty_like(batch.q), window_size=p.window_size)))
    return runs


def _default(p: Problem, device: torch.device, kv_fp8: bool = False) -> AttentionConfig:
    return default_config(device, sum(q for q, _ in p.seqs), len(p.seqs), p.num_q_heads, p.num_kv_heads,
                          p.head_size, kv_fp8)


def _time(fn) -> float:
    try:
        return median_ms(fn, torch.device("cuda"), warmup=5, rep=25)[0]
    except Exception:  # out of shared memory or registers on this device: not a candidate here
        return math.inf


def _check(batch, p: Problem, config: AttentionConfig) -> None:
    out = torch.full_like(batch.q, float("nan"))
    unified_attention(*batch.kernel_args(out, window_size=p.window_size), config=config)
    rows, ref = reference_sample(batch, p.window_size)
    err = ((out[rows].double() - ref).norm() / ref.norm()).item()
    if not err <= ERROR_BOUND:
        raise RuntimeError(f"{p.name}: tuned config {config} is off the reference by {err:.2e}")
