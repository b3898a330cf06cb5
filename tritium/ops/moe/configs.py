"""Launch configurations of the fused-MoE GEMMs, chosen per problem class and device.

The class is the layer's shape (experts, experts per token, hidden and intermediate sizes) and the token count
rounded up to a power of two; like attention's, the choice uses static facts only, so it holds for every replay
of a captured CUDA graph. Tuned entries (`tritium tune --op moe`) are looked up by device, a device without its own
taking its nearest sibling's (`tritium.ops.devices`); a class missing from the table borrows the entry of the same
shape at the nearest token count; a shape with no entries gets configs derived from the rows each expert can
expect.
"""

import functools
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import triton

from tritium.ops.attention.configs import user_cache_path as attention_cache_path
from tritium.ops.devices import TableChoice, choose_table, device_key

_CLASS = re.compile(r"moe-(?P<shape>e(?P<e>\d+)-k(?P<k>\d+)-h(?P<h>\d+)-i(?P<i>\d+))-t(?P<t>\d+)")


@dataclass(frozen=True)
class GemmConfig:
    """The tile of one grouped GEMM: block_m rows of one expert (assignments) by block_n output columns, block_k
    of the reduction per step; all powers of two, at least 16 (tl.dot's smallest)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def validate(self, name: str) -> None:
        for field in ("block_m", "block_n", "block_k"):
            value = getattr(self, field)
            if value < 16 or value & (value - 1):
                raise ValueError(f"config.{name}.{field} must be a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"config.{name}: num_warps must be a power of two up to 16 and num_stages in [1, 8], "
                             f"got {self.num_warps}, {self.num_stages}")


@dataclass(frozen=True)
class MoEConfig:
    """One config per GEMM: the gate/up projection (with SiLU-and-mul) and the down projection."""

    gate_up: GemmConfig
    down: GemmConfig

    def validate(self) -> None:
        self.gate_up.validate("gate_up")
        self.down.validate("down")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "MoEConfig":
        return cls(GemmConfig(**fields["gate_up"]), GemmConfig(**fields["down"]))


def problem_class(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int) -> str:
    """The key tuned configs are stored under, e.g. `moe-e8-k2-h4096-i14336-t64` (tokens rounded up to a power of
    two)."""
    return f"moe-e{num_experts}-k{top_k}-h{hidden}-i{inter}-t{triton.next_power_of_2(max(1, num_tokens))}"


def class_fields(cls: str) -> dict[str, str]:
    """The parts of a class key: shape, e, k, h, i, t. Raises ValueError for a key not of that form."""
    m = _CLASS.fullmatch(cls)
    if m is None:
        raise ValueError(f"not a MoE problem class: {cls!r}")
    return m.groupdict()


def choose_config(device: torch.device, num_tokens: int, num_experts: int, top_k: int, hidden: int,
                  inter: int) -> MoEConfig:
    """The tuned config of this layer's class on this device, else one derived from its shape."""
    tuned = lookup_tuned(device, problem_class(num_tokens, num_experts, top_k, hidden, inter))
    return tuned if tuned is not None else default_config(device, num_tokens, num_experts, top_k)


def default_config(device: torch.device, num_tokens: int, num_experts: int, top_k: int) -> MoEConfig:
    """A config from the rows an expert gets on average (tokens * top_k / experts): 16-row tiles with long
    reductions per step while the weights' bytes dominate, large tiles once the products do."""
    if device.type != "cuda":  # the interpreter: small tiles keep it quick and still loop over several
        small = GemmConfig(16, 32, 32, 4, 1)
        return MoEConfig(small, small)
    rows = num_tokens * top_k / num_experts
    if rows <= 16:
        return MoEConfig(GemmConfig(16, 64, 128, 4, 4), GemmConfig(16, 64, 128, 4, 4))
    if rows <= 96:
        return MoEConfig(GemmConfig(64, 64, 64, 4, 3), GemmConfig(64, 128, 64, 4, 3))
    return MoEConfig(GemmConfig(128, 128, 64, 8, 3), GemmConfig(128, 128, 64, 8, 3))


def user_cache_path() -> Path:
    """Where `tritium tune --op moe` writes: beside attention's cache, moe_configs.json."""
    return attention_cache_path().with_name("moe_configs.json")


def load_tables() -> dict[str, dict[str, dict]]:
    """The shipped table overlaid with the user's tuned cache: {device_key: {problem_class: config fields}}."""
    tables = json.loads(resources.files("tritium.ops.moe").joinpath("tuned_configs.json").read_text())
    path = user_cache_path()
    if not path.is_file():
        return tables
    try:
        user = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        warnings.warn(f"ignoring unreadable tuned-config cache {path}: {exc}", stacklevel=2)
        return tables
    if not isinstance(user, dict):
        warnings.warn(f"ignoring tuned-config cache {path}: not a JSON object", stacklevel=2)
        return tables
    for key, classes in user.items():
        good = {c: f for c, f in classes.items() if _is_config(f)} if isinstance(classes, dict) else {}
        if len(good) != (len(classes) if isinstance(classes, dict) else -1):
            warnings.warn(f"{path}: ignoring malformed entries under {key!r}", stacklevel=2)
        tables.setdefault(key, {}).update(good)
    return tables


def _is_config(fields: object) -> bool:
    """An entry a user cache may hold: gate_up and down, each GemmConfig's fields as integers."""
    names = set(GemmConfig.__dataclass_fields__)
    return (isinstance(fields, dict) and set(fields) == {"gate_up", "down"}
            and all(isinstance(g, dict) and {"block_m", "block_n", "block_k"} <= set(g) <= names
                    and all(type(v) is int for v in g.values()) for g in fields.values()))


@functools.cache
def _table_choice(key: str) -> TableChoice:
    return choose_table(load_tables(), key)


def reload_tables() -> None:
    """Forget the loaded tables: the next lookup reads the files again (after `tritium tune --op moe`)."""
    _table_choice.cache_clear()


def table_choice(device: torch.device) -> TableChoice:
    """Which tuned table this device runs with (its own, a sibling's, or none) and where it comes from."""
    return _table_choice(device_key(device))


def lookup_tuned(device: torch.device, cls: str) -> MoEConfig | None:
    """The tuned config of a class (`table_choice`): the device's own entry, else its sibling's; failing both, the
    entry of the same shape at the nearest token count in either (own first at equal distance, then the larger
    count)."""
    layers = [entries for entries, _ in table_choice(device).layers()]
    for entries in layers:
        if cls in entries:
            return MoEConfig.from_dict(entries[cls])
    wanted = _CLASS.fullmatch(cls)
    if wanted is None:
        return None
    near = [(abs(math.log2(int(m["t"]) / int(wanted["t"]))), layer, -int(m["t"]), key)
            for layer, entries in enumerate(layers) for key in entries
            if (m := _CLASS.fullmatch(key)) is not None and m["shape"] == wanted["shape"]]
    if not near:
        return None
    *_, layer, _, key = min(near)
    return MoEConfig.from_dict(layers[layer][key])
