"""Which tuned table a device takes (tritium/ops/devices.py): its own, a sibling's, or none."""

import pytest

from tritium.ops.devices import DeviceKey, choose_table

H100 = "nvidia:NVIDIA H100 80GB HBM3:cc90:sm132"
H200 = "nvidia:NVIDIA H200:cc90:sm132"
H100_PCIE = "nvidia:NVIDIA H100 PCIe:cc90:sm114"
A100 = "nvidia:NVIDIA A100-SXM4-80GB:cc80:sm108"
MI300 = "amd:AMD Instinct MI300X:gfx942:sm304"


def test_key_round_trips():
    key = DeviceKey.parse(H100)
    assert key == DeviceKey("nvidia", "NVIDIA H100 80GB HBM3", "cc90", 132)
    assert str(key) == H100
    assert DeviceKey.parse("cpu") is None


def test_own_table_wins():
    tables = {H200: {"a": {}}, H100: {"b": {}}}
    choice = choose_table(tables, H200)
    assert (choice.source, choice.own, choice.sibling, choice.sibling_key) == ("own", {"a": {}}, {"b": {}}, H100)
    assert choice.layers() == [({"a": {}}, 1.0), ({"b": {}}, 1.0)]  # own entries first, then the sibling's
    assert "this device's tuned table (1 classes), then its sibling" in choice.describe()


def test_sibling_of_same_architecture_nearest_in_multiprocessors():
    tables = {H100_PCIE: {"p": {}}, H100: {"s": {}}, A100: {"x": {}}, MI300: {"y": {}}}
    choice = choose_table(tables, H200)
    assert (choice.source, choice.sibling_key, choice.own, choice.sibling) == ("sibling", H100, {}, {"s": {}})
    assert choice.sm_ratio == 1.0
    assert H100 in choice.describe()
    # A card with fewer multiprocessors takes the closer sibling, and the ratio scales its splits.
    small = "nvidia:NVIDIA H100 NVL:cc90:sm120"
    choice = choose_table(tables, small)
    assert choice.sibling_key == H100_PCIE
    assert choice.sm_ratio == pytest.approx(120 / 114)


@pytest.mark.parametrize("key", [
    "nvidia:NVIDIA B200:cc100:sm148",  # another architecture
    "amd:AMD Instinct MI250X:gfx90a:sm220",  # another vendor's and architecture's
    "cpu",
])
def test_no_sibling_means_derived(key):
    tables = {H100: {"s": {}}, MI300: {"y": {}}, "nvidia:NVIDIA B200:cc100:sm148": {}}  # an empty table is none
    choice = choose_table(tables, key)
    assert (choice.source, choice.own, choice.sibling, choice.sibling_key) == ("derived", {}, {}, None)
    assert "derived" in choice.describe()
