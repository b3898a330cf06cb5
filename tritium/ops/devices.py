"""Which tuned table a device takes: its own, else its nearest sibling's (same vendor and architecture).

Tables of tuned kernel configs are keyed by device (`vendor:name:arch:smN`). A card of a known architecture
with no entries of its own (an H200 where only an H100 was tuned) runs the sibling's configs, with split
counts scaled by the multiprocessor ratio, rather than configs derived from its shape: on an H200 the H100's
table ran the attention suite at 0.93x FA3 where derived configs ran 0.82x (docs/benchmarks.md).
"""

import math
import re
from dataclasses import dataclass

import torch

_KEY = re.compile(r"(?P<vendor>[^:]+):(?P<name>.*):(?P<arch>[^:]+):sm(?P<sms>\d+)")


@dataclass(frozen=True)
class DeviceKey:
    """What a tuned table is keyed by: vendor, product name, architecture (cc90, gfx942) and multiprocessors."""

    vendor: str
    name: str
    arch: str
    sms: int

    def __str__(self) -> str:
        return f"{self.vendor}:{self.name}:{self.arch}:sm{self.sms}"

    @classmethod
    def parse(cls, text: str) -> "DeviceKey | None":
        """The key a table entry names, or None for one not of that form ("cpu", say)."""
        m = _KEY.fullmatch(text)
        return None if m is None else cls(m["vendor"], m["name"], m["arch"], int(m["sms"]))


def device_key(device: torch.device) -> str:
    """The table key of a device; "cpu" for the CPU (Triton's interpreter: nothing is tuned there)."""
    if device.type != "cuda":
        return "cpu"
    p = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        return str(DeviceKey("amd", p.name, p.gcnArchName.split(":")[0], p.multi_processor_count))
    return str(DeviceKey("nvidia", p.name, f"cc{p.major}{p.minor}", p.multi_processor_count))


@dataclass(frozen=True)
class TableChoice:
    """The tuned entries a device runs with: its own (tuned on it: shipped, or cached by `tritium tune` or the
    engine's auto-tune), then, for classes those lack, its nearest sibling's (same vendor and architecture), whose
    split counts are scaled by sm_ratio (this device's multiprocessors over the sibling's). Classes neither has get
    configs derived from the device's shape."""

    own: dict[str, dict]
    sibling: dict[str, dict]
    sibling_key: str | None = None
    sm_ratio: float = 1.0

    @property
    def source(self) -> str:
        """"own" where the device has entries of its own, else "sibling" or "derived"."""
        return "own" if self.own else "sibling" if self.sibling else "derived"

    def layers(self) -> list[tuple[dict[str, dict], float]]:
        """(entries, split scale) to look in, in order: own, then the sibling's."""
        return [(self.own, 1.0), (self.sibling, self.sm_ratio)]

    def describe(self) -> str:
        sibling = (f"{self.sibling_key}'s tuned table ({len(self.sibling)} classes; split counts scaled by "
                   f"{self.sm_ratio:.2f}x multiprocessors)") if self.sibling else None
        if self.own:
            return f"this device's tuned table ({len(self.own)} classes)" + (f", then its sibling {sibling}"
                                                                              if sibling else "")
        if sibling:
            return f"no tuned table of its own: its sibling {sibling}"
        return "no tuned table for this device or a sibling: configs derived from its shape"


def choose_table(tables: dict[str, dict[str, dict]], key: str) -> TableChoice:
    """The entries a device keyed `key` runs with: its own, and those of the sibling with the closest
    multiprocessor count (then the same product name, then the key's order)."""
    own = tables.get(key) or {}
    me = DeviceKey.parse(key)
    siblings = []
    for other_key, entries in tables.items():
        other = DeviceKey.parse(other_key)
        if (me is not None and other_key != key and entries and other is not None
                and (other.vendor, other.arch) == (me.vendor, me.arch)):
            siblings.append((abs(math.log(other.sms / me.sms)), other.name != me.name, other_key, other))
    if not siblings:
        return TableChoice(own, {})
    *_, other_key, other = min(siblings)
    return TableChoice(own, tables[other_key], other_key, me.sms / other.sms)
