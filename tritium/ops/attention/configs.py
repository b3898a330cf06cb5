"""Launch configurations for the unified attention kernel, chosen per batch shape and device.

The choice uses only static facts (token count, sequence count, heads, head size, device), never the
values of sequence lengths, so one choice holds for every replay of a captured CUDA graph.
"""

import functools
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import triton

from tritium.ops.devices import TableChoice, choose_table, device_key

# Programs per multiprocessor that a decode batch should offer before its keys are split.
_SPLIT_TARGET_PER_SM = 2
_MAX_SPLITS = 32
_CLASS = re.compile(
    r"(?P<kind>decode-q(?P<q>\d+)|mixed|prefill)(?:-p(?P<p>\d+))?-(?P<shape>g(?P<g>\d+)-d(?P<d>\d+))-pg(?P<page>\d+)"
    r"(?P<fp8>-fp8)?")


@dataclass(frozen=True)
class AttentionConfig:
    """How one launch is shaped.

    block_m: query rows per program (query tokens times the query heads of one KV head), power of two.
    tile_k: keys per step of the inner loop, power of two, at least 16.
    num_splits: programs that share one query tile's keys (1: no split and no merge launch).
    page_lookahead: 1 reads each key tile's block-table entries one step early, which lets the compiler
        pipeline the K/V loads one stage deeper (faster for large query tiles), 0 reads them in the step.
    tma: 1 fetches K/V tiles through tensor descriptors (Hopper's tensor-memory accelerator) wherever the launch
        allows it (`kernel.tma_applies`: a tile within one page, among others), pointer loads elsewhere; 0
        always uses pointer loads.
    fp8_dot: 1 runs the two dots on fp8 operands (fp8 tensor cores) where the query and K/V are fp8, the device has
        them and the tile is large enough (`unified.dot_dtype`), 0 converts the operands to bfloat16 (float32 in the
        interpreter) there.
    """

    block_m: int
    tile_k: int
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2
    page_lookahead: int = 0
    tma: int = 0
    fp8_dot: int = 1

    def validate(self, group: int) -> None:
        for name in ("block_m", "tile_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"config.{name} must be a power of two >= 16, got {value}")
        if self.block_m < group:
            raise ValueError(f"config.block_m={self.block_m} is smaller than the GQA group ({group} query heads "
                             "per KV head)")
        if not 1 <= self.num_splits <= 256:
            raise ValueError(f"config.num_splits must be in [1, 256], got {self.num_splits}")
        for name in ("page_lookahead", "tma", "fp8_dot"):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"config.{name} must be 0 or 1, got {getattr(self, name)}")


def has_tma(device: torch.device) -> bool:
    """Whether the device has a tensor-memory accelerator for tensor descriptors: NVIDIA compute capability 9+."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def has_fp8_dots(device: torch.device) -> bool:
    """Whether the device's tensor cores take fp8 (e4m3) operands: NVIDIA compute capability 8.9+ (Ada, Hopper and
    later)."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 9)


def multiprocessor_count(device: torch.device) -> int:
    """SMs (CUDA) or compute units; a small stand-in on the CPU so that splitting is still exercised."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_config(
    device: torch.device, num_tokens: int, num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
    page_size: int, kv_fp8: bool = False,
) -> AttentionConfig:
    """The tuned configuration for this batch's problem class on this device (K/V pages in fp8 with `kv_fp8`), else
    one derived from its shape."""
    cls = problem_class(num_tokens, num_seqs, num_q_heads, num_kv_heads, head_dim, page_size, kv_fp8)
    tuned = lookup_tuned(device, cls)
    if tuned is not None:
        return tuned
    return default_config(device, num_tokens, num_seqs, num_q_heads, num_kv_heads, head_dim, kv_fp8)


def default_config(
    device: torch.device, num_tokens: int, num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
    kv_fp8: bool = False,
) -> AttentionConfig:
    """A configuration derived from the batch shape, the K/V pages' dtype and the device's multiprocessor count."""
    group = num_q_heads // num_kv_heads
    tokens_per_seq = max(1, -(-num_tokens // max(num_seqs, 1)))
    rows = triton.next_power_of_2(group * tokens_per_seq)
    large_head = head_dim > 128
    if device.type != "cuda":
        # The interpreter runs on the CPU: small tiles keep it quick and still cover multi-tile loops.
        return AttentionConfig(block_m=max(16, min(rows, 32), triton.next_power_of_2(group)), tile_k=16,
                               num_splits=_splits(device, num_tokens, num_seqs, num_kv_heads, group))
    if rows <= 16 and group <= 16:
        splits = _splits(device, num_tokens, num_seqs, num_kv_heads, group)
        # fp8 pages: 128-key tiles. On the H200 (8B heads, 64 x 8k decode) they ran 0.37 ms where 64-key ones took
        # 0.49 ms; a byte per value halves what a tile's load brings in (docs/benchmarks.md).
        tile_k = (128 if kv_fp8 else 64) if not large_head else 32
        return AttentionConfig(block_m=16, tile_k=tile_k, num_splits=splits,
                               num_warps=4, num_stages=3 if not large_head else 2)
    block_m = max(64 if large_head else 128, triton.next_power_of_2(group))
    return AttentionConfig(block_m=block_m, tile_k=64 if not large_head else 32, num_splits=1,
                           num_warps=8 if block_m >= 128 else 4, num_stages=3 if not large_head else 2,
                           page_lookahead=0 if large_head else 1, tma=int(has_tma(device)))


def problem_class(
    num_tokens: int, num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
    kv_fp8: bool = False,
) -> str:
    """The key under which tuned configs are stored, e.g. `decode-q1-p512-g4-d128-pg16` or `prefill-g4-d128-pg64`
    (`...-pg16-fp8` over fp8 K/V pages).

    Decode-like batches (at most 8 query tokens per sequence) are keyed by query tokens per sequence and by
    the count of (sequence, KV head) programs, which decides how far keys should be split. The page size is
    part of the key because tiles that fit in a page take a different (contiguous) load path, and the pages' dtype
    because fp8 pages want other tiles (the best bf16 decode config ran 64 x 8k fp8 pages 1.5x slower than their own).
    """
    group = num_q_heads // num_kv_heads
    per_seq = -(-num_tokens // max(num_seqs, 1))
    shape = f"g{group}-d{triton.next_power_of_2(head_dim)}-pg{page_size}{'-fp8' if kv_fp8 else ''}"
    if per_seq <= 8:
        programs = triton.next_power_of_2(max(1, num_seqs * num_kv_heads))
        return f"decode-q{triton.next_power_of_2(per_seq)}-p{programs}-{shape}"
    return f"{'mixed' if per_seq <= 256 else 'prefill'}-{shape}"


def class_fields(cls: str) -> dict[str, str | None]:
    """The parts of a problem-class key: kind, q (query tokens per sequence, decode), p (programs, decode), shape,
    g (group), d (head size), page, fp8 ("-fp8" for fp8 K/V pages, else None). Raises ValueError for a key not of
    that form."""
    m = _CLASS.fullmatch(cls)
    if m is None:
        raise ValueError(f"not a problem class: {cls!r}")
    return m.groupdict()


def user_cache_path() -> Path:
    """Where `tritium tune` writes: $TRITIUM_CACHE_DIR, else $XDG_CACHE_HOME/tritium, else ~/.cache/tritium."""
    root = os.environ.get("TRITIUM_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tritium"
    return Path(root) / "attention_configs.json"


def load_tables() -> dict[str, dict[str, dict]]:
    """The shipped table overlaid with the user's tuned cache: {device_key: {problem_class: config fields}}."""
    tables = json.loads(resources.files("tritium.ops.attention").joinpath("tuned_configs.json").read_text())
    path = user_cache_path()
    if path.is_file():
        try:
            user = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            warnings.warn(f"ignoring unreadable tuned-config cache {path}: {exc}", stacklevel=2)
            user = {}
        for key, classes in user.items() if isinstance(user, dict) else ():
            good = {c: f for c, f in classes.items() if _is_config(f)} if isinstance(classes, dict) else {}
            if len(good) != (len(classes) if isinstance(classes, dict) else -1):
                warnings.warn(f"{path}: ignoring malformed entries under {key!r}", stacklevel=2)
            tables.setdefault(key, {}).update(good)
        if not isinstance(user, dict):
            warnings.warn(f"ignoring tuned-config cache {path}: not a JSON object", stacklevel=2)
    return tables


def _is_config(fields: object) -> bool:
    """An entry a user cache may hold: AttentionConfig's fields (those with defaults may be missing), integers."""
    names = set(AttentionConfig.__dataclass_fields__)
    return (isinstance(fields, dict) and {"block_m", "tile_k"} <= set(fields) <= names
            and all(type(v) is int for v in fields.values()))


@functools.cache
def _table_choice(key: str) -> TableChoice:
    return choose_table(load_tables(), key)


_generation = 0


def reload_tables() -> None:
    """Forget the loaded tables, and the launch plans chosen from them: the next lookup reads the files again
    (after `tritium tune` or the engine's auto-tune wrote new entries)."""
    global _generation
    _generation += 1
    _table_choice.cache_clear()


def tables_generation() -> int:
    """Bumped by each `reload_tables`: part of the key under which launch plans are kept."""
    return _generation


def table_choice(device: torch.device) -> TableChoice:
    """Which tuned table this device runs with (its own, a sibling's, or none) and where it comes from."""
    return _table_choice(device_key(device))


def lookup_tuned(device: torch.device, cls: str) -> AttentionConfig | None:
    """The tuned config for a problem class (`table_choice`): the device's own entry for it, else its sibling's;
    failing both, the entry of the same kind and shape at the nearest page size, then (decode) the nearest program
    count, own before the sibling's. Split counts are scaled to keep the same programs per multiprocessor: by the
    program counts of the two classes and, for a sibling's entry, by the two devices' multiprocessor counts."""
    layers = table_choice(device).layers()
    for entries, sm_ratio in layers:
        if cls in entries:
            return _scaled(entries[cls], cls, cls, sm_ratio)
    for entries, sm_ratio in layers:
        key = _nearest_class(entries, cls)
        if key is not None:
            return _scaled(entries[key], key, cls, sm_ratio)
    return None


def _scaled(fields: dict, key: str, cls: str, sm_ratio: float) -> AttentionConfig:
    """The entry stored under class `key`, for class `cls` on a device with sm_ratio times its multiprocessors."""
    fields = dict(fields)
    scale = sm_ratio
    if key != cls:
        scale *= int(class_fields(key)["p"] or 1) / int(class_fields(cls)["p"] or 1)
    if scale != 1.0 and class_fields(key)["p"]:  # a decode class: its keys may be split
        fields["num_splits"] = max(1, min(_MAX_SPLITS, round(fields.get("num_splits", 1) * scale)))
    return AttentionConfig(**fields)


def _nearest_class(table: dict[str, dict], cls: str) -> str | None:
    """The table's class of the same kind, shape and page dtype as `cls` at the nearest page size, then program
    count."""
    wanted = _CLASS.fullmatch(cls)
    if wanted is None:
        return None
    near = []
    for key in table:
        m = _CLASS.fullmatch(key)
        if m is None or (m["kind"], m["shape"], m["fp8"]) != (wanted["kind"], wanted["shape"], wanted["fp8"]):
            continue
        page_distance = abs(math.log2(int(m["page"]) / int(wanted["page"])))
        program_distance = abs(math.log2(int(m["p"]) / int(wanted["p"]))) if m["p"] else 0.0
        near.append((page_distance, program_distance, key))
    return min(near)[2] if near else None


def _splits(device: torch.device, num_tokens: int, num_seqs: int, num_kv_heads: int, group: int) -> int:
    """Key splits for a decode-like batch: enough programs to fill the device, no more."""
    if num_tokens > 4 * num_seqs:
        return 1
    programs = max(1, num_seqs * num_kv_heads)
    wanted = _SPLIT_TARGET_PER_SM * multiprocessor_count(device)
    return max(1, min(_MAX_SPLITS, -(-wanted // programs)))
