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
    """The entries a device runs with and where they come from.

    source: "own" (tuned on this device), "sibling" (another device of the same vendor and architecture),
    or "derived" (no table: configs come from the device's shape). sm_ratio is this device's multiprocessor
    count over the table's device's, by which split counts are scaled.
    """

    entries: dict[str, dict]
    source: str
    table_key: str | None = None
    sm_ratio: float = 1.0

    def describe(self) -> str:
        if self.source == "own":
            return f"tuned table of this device ({self.table_key}, {len(self.entries)} classes)"
        if self.source == "sibling":
            return (f"sibling's tuned table ({self.table_key}, {len(self.entries)} classes; split counts scaled by "
                    f"{self.sm_ratio:.2f}x multiprocessors)")
        return "no tuned table for this device or a sibling: configs derived from its shape"


def choose_table(tables: dict[str, dict[str, dict]], key: str) -> TableChoice:
    """The table a device keyed `key` uses: its own when it has entries, else the sibling with the closest
    multiprocessor count (then the same product name, then the key's order), else none."""
    if tables.get(key):
        return TableChoice(tables[key], "own", key)
    me = DeviceKey.parse(key)
    if me is None:
        return TableChoice({}, "derived")
    siblings = []
    for other_key, entries in tables.items():
        other = DeviceKey.parse(other_key)
        if entries and other is not None and (other.vendor, other.arch) == (me.vendor, me.arch):
            siblings.append((abs(math.log(other.sms / me.sms)), other.name != me.name, other_key, other))
    if not siblings:
        return TableChoice({}, "derived")
    *_, other_key, other = min(siblings)
    return TableChoice(tables[other_key], "sibling", other_key, me.sms / other.sms)
