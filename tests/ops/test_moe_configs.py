"""Launch-configuration choice of the fused-MoE kernels (tritium/ops/moe/configs.py): problem classes, the tuned
table's lookup with its nearest-token-count fallback, the user cache, derived defaults, the shipped table."""

import json
from importlib import resources

import pytest
import torch

from tritium.ops.moe import configs
from tritium.ops.moe.configs import GemmConfig, MoEConfig

CPU = torch.device("cpu")
SHAPE = "e8-k2-h4096-i14336"


def entry(block_m: int) -> dict:
    return MoEConfig(GemmConfig(block_m, 64, 128), GemmConfig(block_m, 32, 64, 8, 4)).to_dict()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty user cache of our own, under the CPU's device key ("cpu"); memoized tables dropped before and
    after."""
    monkeypatch.setenv("TRITIUM_CACHE_DIR", str(tmp_path))
    configs.reload_tables()
    yield tmp_path
    configs.reload_tables()


def write_cache(cache_dir, tables: dict) -> None:
    (cache_dir / "moe_configs.json").write_text(json.dumps(tables))
    configs.reload_tables()


@pytest.mark.parametrize("tokens, bucket", [(1, 1), (2, 2), (3, 4), (64, 64), (65, 128), (4096, 4096), (5000, 8192)])
def test_problem_class(tokens, bucket):
    cls = configs.problem_class(tokens, 8, 2, 4096, 14336)
    assert cls == f"moe-{SHAPE}-t{bucket}"
    assert configs.class_fields(cls) == {"shape": SHAPE, "e": "8", "k": "2", "h": "4096", "i": "14336",
                                         "t": str(bucket)}


@pytest.mark.parametrize("key", ["moe-e8-k2-h4096-i14336", "decode-q1-p8-g4-d128-pg16", "moe-e8-k2-h4096-i14336-t"])
def test_class_fields_refuses_other_keys(key):
    with pytest.raises(ValueError, match="not a MoE problem class"):
        configs.class_fields(key)


def test_lookup_exact_then_nearest_token_count(cache_dir):
    write_cache(cache_dir, {"cpu": {f"moe-{SHAPE}-t16": entry(16), f"moe-{SHAPE}-t512": entry(64),
                                    "moe-e128-k8-h2048-i768-t1": entry(32)}})
    assert configs.lookup_tuned(CPU, f"moe-{SHAPE}-t16") == MoEConfig.from_dict(entry(16))
    assert configs.lookup_tuned(CPU, f"moe-{SHAPE}-t1").gate_up.block_m == 16
    assert configs.lookup_tuned(CPU, f"moe-{SHAPE}-t64").gate_up.block_m == 16  # 2 steps from 16, 3 from 512
    assert configs.lookup_tuned(CPU, f"moe-{SHAPE}-t8192").gate_up.block_m == 64
    assert configs.lookup_tuned(CPU, "moe-e8-k2-h4096-i1024-t16") is None  # no entry of this shape
    cfg = configs.choose_config(CPU, 3, 8, 2, 4096, 1024)
    assert cfg == configs.default_config(CPU, 3, 8, 2)


def test_user_cache_skips_malformed_entries(cache_dir):
    bad = {"gate_up": {"block_m": 16, "block_n": 32}, "down": entry(16)["down"]}  # block_k missing
    write_cache(cache_dir, {"cpu": {f"moe-{SHAPE}-t1": bad, f"moe-{SHAPE}-t2": entry(32)}})
    with pytest.warns(UserWarning, match="ignoring malformed entries"):
        table = configs.table_choice(CPU).own
    assert list(table) == [f"moe-{SHAPE}-t2"]
    (cache_dir / "moe_configs.json").write_text("{not json")
    configs.reload_tables()
    with pytest.warns(UserWarning, match="unreadable"):
        assert configs.table_choice(CPU).own == {}


def test_sibling_table(cache_dir, monkeypatch):
    """A device with no entries of its own runs its nearest same-architecture sibling's; with some, its own exact
    entry, then the sibling's exact one, then the nearest token count in either."""
    # Keys of an architecture the shipped table has no entries for, so that only the user cache's count.
    sibling, device = "nvidia:NVIDIA A100-SXM4-80GB:cc80:sm108", "nvidia:NVIDIA A800-SXM4-80GB:cc80:sm108"
    write_cache(cache_dir, {sibling: {f"moe-{SHAPE}-t16": entry(32), f"moe-{SHAPE}-t4096": entry(128)}})
    monkeypatch.setattr(configs, "device_key", lambda _: device)
    assert configs.table_choice(CPU).source == "sibling"
    assert configs.choose_config(CPU, 16, 8, 2, 4096, 14336) == MoEConfig.from_dict(entry(32))
    write_cache(cache_dir, {sibling: {f"moe-{SHAPE}-t16": entry(32), f"moe-{SHAPE}-t4096": entry(128)},
                            device: {f"moe-{SHAPE}-t1": entry(16)}})
    assert configs.choose_config(CPU, 1, 8, 2, 4096, 14336).gate_up.block_m == 16  # own
    assert configs.choose_config(CPU, 16, 8, 2, 4096, 14336).gate_up.block_m == 32  # the sibling's exact entry
    assert configs.choose_config(CPU, 2048, 8, 2, 4096, 14336).gate_up.block_m == 128  # the sibling's t4096
    assert configs.choose_config(CPU, 2, 8, 2, 4096, 14336).gate_up.block_m == 16  # own t1


def test_defaults_follow_rows_per_expert():
    cuda = torch.device("cuda")  # only its type is read
    assert configs.default_config(cuda, 1, 8, 2).gate_up.block_m == 16
    assert configs.default_config(cuda, 256, 128, 8).gate_up.block_m == 16  # 16 rows per expert
    assert configs.default_config(cuda, 512, 128, 8).gate_up.block_m == 64
    assert configs.default_config(cuda, 4096, 8, 2).gate_up.block_m == 128
    small = configs.default_config(CPU, 4096, 8, 2)
    assert small.gate_up.block_m == 16 and small.gate_up.block_n == 32  # the interpreter's
    for cfg in (configs.default_config(cuda, t, 8, 2) for t in (1, 64, 4096)):
        cfg.validate()


def test_shipped_table_is_valid():
    tables = json.loads(resources.files("tritium.ops.moe").joinpath("tuned_configs.json").read_text())
    for key, classes in tables.items():
        for cls, fields in classes.items():
            configs.class_fields(cls)
            assert configs._is_config(fields), (key, cls)
            MoEConfig.from_dict(fields).validate()
