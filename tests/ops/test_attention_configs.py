"""Launch-configuration choice (tritium/ops/attention/configs.py): problem classes, validation, the tuned-table
lookup with its fallbacks, the user cache's location, and the shipped table."""

import json
from dataclasses import MISSING, asdict, fields
from importlib import resources

import pytest
import torch
import triton

from tritium.ops.attention import configs
from tritium.ops.attention.configs import AttentionConfig

CPU = torch.device("cpu")
H100 = "nvidia:NVIDIA H100 80GB HBM3:cc90:sm132"  # a device key of the shipped table


def entry(block_m: int = 16, tile_k: int = 32, num_splits: int = 1, num_warps: int = 4, num_stages: int = 2) -> dict:
    return asdict(AttentionConfig(block_m, tile_k, num_splits, num_warps, num_stages))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty user cache of our own; the memoized tables are dropped before and after."""
    monkeypatch.setenv("TRITIUM_CACHE_DIR", str(tmp_path))
    configs.reload_tables()
    yield tmp_path
    configs.reload_tables()


def write_cache(cache_dir, tables: dict) -> None:
    (cache_dir / "attention_configs.json").write_text(json.dumps(tables))
    configs.reload_tables()


# --- problem_class ---


@pytest.mark.parametrize("num_tokens, num_seqs, kind", [
    (1, 1, "decode-q1"), (32, 32, "decode-q1"),
    (2, 1, "decode-q2"), (3, 1, "decode-q4"), (4, 1, "decode-q4"), (5, 1, "decode-q8"), (8, 1, "decode-q8"),
    (16, 2, "decode-q8"), (9, 2, "decode-q8"),  # ceil(9 / 2) = 5 tokens per sequence
    (9, 1, "mixed"), (17, 2, "mixed"),  # ceil(17 / 2) = 9
    (256, 1, "mixed"), (512, 2, "mixed"), (2175, 128, "mixed"),
    (257, 1, "prefill"), (513, 2, "prefill"), (8192, 1, "prefill"),
])
def test_problem_class_kind_boundaries(num_tokens, num_seqs, kind):
    cls = configs.problem_class(num_tokens, num_seqs, 32, 8, 128, 16)
    parts = configs.class_fields(cls)
    assert parts["kind"] == kind, cls
    assert (parts["shape"], parts["g"], parts["d"], parts["page"]) == ("g4-d128", "4", "128", "16")
    assert (parts["p"] is not None) == (parts["q"] is not None) == kind.startswith("decode"), cls
    if parts["q"] is not None:
        assert kind == f"decode-q{parts['q']}"


@pytest.mark.parametrize("key", ["decode-q1-g4-d128-pg16x", "prefill-g4-d128", "decode-p8-g4-d128-pg16", ""])
def test_class_fields_refuses_other_keys(key):
    with pytest.raises(ValueError, match="not a problem class"):
        configs.class_fields(key)


@pytest.mark.parametrize("num_seqs, num_kv_heads, programs", [
    (1, 1, 1), (1, 8, 8), (3, 8, 32), (16, 8, 128), (17, 8, 256), (5, 1, 8), (64, 8, 512), (256, 8, 2048),
])
def test_problem_class_program_bucket(num_seqs, num_kv_heads, programs):
    cls = configs.problem_class(num_seqs, num_seqs, 4 * num_kv_heads, num_kv_heads, 128, 16)
    assert cls == f"decode-q1-p{programs}-g4-d128-pg16"


@pytest.mark.parametrize("head_dim, padded", [(64, 64), (72, 128), (80, 128), (96, 128), (128, 128), (192, 256),
                                              (256, 256), (40, 64)])
def test_problem_class_pads_head_dim(head_dim, padded):
    assert configs.problem_class(1, 1, 8, 2, head_dim, 16) == f"decode-q1-p2-g4-d{padded}-pg16"
    assert configs.problem_class(1000, 1, 8, 2, head_dim, 16) == f"prefill-g4-d{padded}-pg16"


@pytest.mark.parametrize("page_size", [1, 16, 24, 64, 128])
def test_problem_class_keys_page_size_and_group(page_size):
    assert configs.problem_class(8, 8, 64, 8, 128, page_size) == f"decode-q1-p64-g8-d128-pg{page_size}"
    assert configs.problem_class(100, 1, 32, 1, 128, page_size) == f"mixed-g32-d128-pg{page_size}"
    assert configs.problem_class(4096, 2, 8, 8, 64, page_size) == f"prefill-g1-d64-pg{page_size}"


def test_problem_class_examples_from_docstring():
    assert configs.problem_class(128, 128, 16, 4, 128, 16) == "decode-q1-p512-g4-d128-pg16"
    assert configs.problem_class(8192, 1, 32, 8, 128, 64) == "prefill-g4-d128-pg64"


# --- AttentionConfig.validate ---


@pytest.mark.parametrize("config, group, message", [
    (AttentionConfig(block_m=8, tile_k=16), 1, "block_m must be a power of two >= 16"),
    (AttentionConfig(block_m=24, tile_k=16), 1, "block_m must be a power of two >= 16"),
    (AttentionConfig(block_m=0, tile_k=16), 1, "block_m must be a power of two >= 16"),
    (AttentionConfig(block_m=16, tile_k=8), 1, "tile_k must be a power of two >= 16"),
    (AttentionConfig(block_m=16, tile_k=48), 1, "tile_k must be a power of two >= 16"),
    (AttentionConfig(block_m=16, tile_k=16), 32, "smaller than the GQA group"),
    (AttentionConfig(block_m=32, tile_k=16), 33, "smaller than the GQA group"),
    (AttentionConfig(block_m=16, tile_k=16, num_splits=0), 1, r"num_splits must be in \[1, 256\]"),
    (AttentionConfig(block_m=16, tile_k=16, num_splits=257), 1, r"num_splits must be in \[1, 256\]"),
    (AttentionConfig(block_m=16, tile_k=16, num_splits=-1), 1, r"num_splits must be in \[1, 256\]"),
    (AttentionConfig(block_m=16, tile_k=16, page_lookahead=2), 1, "page_lookahead must be 0 or 1"),
    (AttentionConfig(block_m=16, tile_k=16, page_lookahead=-1), 1, "page_lookahead must be 0 or 1"),
    (AttentionConfig(block_m=16, tile_k=16, tma=2), 1, "tma must be 0 or 1"),
])
def test_validate_rejects(config, group, message):
    with pytest.raises(ValueError, match=message):
        config.validate(group)


@pytest.mark.parametrize("config, group", [
    (AttentionConfig(16, 16), 1), (AttentionConfig(16, 16), 16), (AttentionConfig(32, 128, 256), 32),
    (AttentionConfig(128, 64, 1, 8, 4), 8), (AttentionConfig(64, 32, 16), 64), (AttentionConfig(64, 64, tma=1), 4),
])
def test_validate_accepts(config, group):
    config.validate(group)


# --- lookup_tuned ---

DECODE_P128 = "decode-q1-p128-g4-d128-pg16"


def test_lookup_exact_hit(cache_dir):
    write_cache(cache_dir, {"cpu": {DECODE_P128: entry(16, 64, 3, 2, 4), "prefill-g4-d128-pg16": entry(64, 32)}})
    assert configs.lookup_tuned(CPU, DECODE_P128) == AttentionConfig(16, 64, 3, 2, 4)
    assert configs.lookup_tuned(CPU, "prefill-g4-d128-pg16") == AttentionConfig(64, 32, 1, 4, 2)


def test_choose_config_uses_the_tuned_entry_of_its_class(cache_dir):
    write_cache(cache_dir, {"cpu": {DECODE_P128: entry(16, 64, 3, 2, 4)}})
    # 32 sequences of one token, 16 query heads over 4 KV heads: 128 programs, group 4.
    assert configs.choose_config(CPU, 32, 32, 16, 4, 128, 16) == AttentionConfig(16, 64, 3, 2, 4)
    # Another page size borrows the same entry (the only one of its kind and shape).
    assert configs.choose_config(CPU, 32, 32, 16, 4, 128, 64) == AttentionConfig(16, 64, 3, 2, 4)


def test_lookup_nearest_page_size(cache_dir):
    write_cache(cache_dir, {"cpu": {
        "decode-q1-p128-g4-d128-pg16": entry(tile_k=32, num_splits=3),
        "decode-q1-p128-g4-d128-pg128": entry(tile_k=128, num_splits=5),
        "prefill-g4-d128-pg16": entry(64, 32),
        "prefill-g4-d128-pg128": entry(128, 64),
    }})
    # pg32 is one doubling from pg16 and two from pg128; pg64 the other way round.
    assert configs.lookup_tuned(CPU, "decode-q1-p128-g4-d128-pg32") == AttentionConfig(16, 32, 3)
    assert configs.lookup_tuned(CPU, "decode-q1-p128-g4-d128-pg8") == AttentionConfig(16, 32, 3)
    assert configs.lookup_tuned(CPU, "decode-q1-p128-g4-d128-pg64") == AttentionConfig(16, 128, 5)
    assert configs.lookup_tuned(CPU, "decode-q1-p128-g4-d128-pg256") == AttentionConfig(16, 128, 5)
    assert configs.lookup_tuned(CPU, "prefill-g4-d128-pg32") == AttentionConfig(64, 32)
    assert configs.lookup_tuned(CPU, "prefill-g4-d128-pg64") == AttentionConfig(128, 64)


def test_lookup_page_size_outranks_program_count(cache_dir):
    """The documented order: nearest page size first, then nearest program count."""
    write_cache(cache_dir, {"cpu": {
        "decode-q1-p128-g4-d128-pg64": entry(tile_k=64, num_splits=3),
        "decode-q1-p1024-g4-d128-pg16": entry(tile_k=32, num_splits=1),
    }})
    # Same page size but 8x the programs wins over the same programs at another page size; the split count
    # is scaled by 1024 / 128 (1 * 8 = 8).
    assert configs.lookup_tuned(CPU, DECODE_P128) == AttentionConfig(16, 32, 8)


@pytest.mark.parametrize("wanted, expected", [
    (128, AttentionConfig(16, 64, 6, 2, 3)),  # exact
    (256, AttentionConfig(16, 64, 3, 2, 3)),  # from p128: 6 * 128 / 256
    (64, AttentionConfig(16, 64, 12, 2, 3)),  # from p128: 6 * 2
    (32, AttentionConfig(16, 64, 24, 2, 3)),  # from p128: 6 * 4
    (8, AttentionConfig(16, 64, 32, 2, 3)),  # from p128: 6 * 16 = 96, clamped to 32
    (1024, AttentionConfig(16, 32, 4, 4, 2)),  # from p2048: 2 * 2
    (4096, AttentionConfig(16, 32, 1, 4, 2)),  # from p2048: 2 / 2
    (65536, AttentionConfig(16, 32, 1, 4, 2)),  # from p2048: 2 / 32, clamped to 1
])
def test_lookup_nearest_program_bucket_scales_splits(cache_dir, wanted, expected):
    write_cache(cache_dir, {"cpu": {
        "decode-q1-p128-g4-d128-pg16": entry(16, 64, 6, 2, 3),
        "decode-q1-p2048-g4-d128-pg16": entry(16, 32, 2, 4, 2),
    }})
    assert configs.lookup_tuned(CPU, f"decode-q1-p{wanted}-g4-d128-pg16") == expected


def test_lookup_program_fallback_keeps_total_programs(cache_dir):
    write_cache(cache_dir, {"cpu": {"decode-q4-p16-g8-d64-pg16": entry(32, 64, 8)}})
    for programs in (4, 8, 16, 32, 64, 128):
        got = configs.lookup_tuned(CPU, f"decode-q4-p{programs}-g8-d64-pg16")
        assert got is not None
        assert got.num_splits == max(1, min(32, 8 * 16 // programs))
        assert (got.block_m, got.tile_k, got.num_warps, got.num_stages) == (32, 64, 4, 2)


@pytest.mark.parametrize("cls", [
    "decode-q2-p128-g4-d128-pg16",  # another query bucket
    "decode-q1-p128-g8-d128-pg16",  # another group
    "decode-q1-p128-g4-d64-pg16",  # another head dim
    "mixed-g4-d128-pg16",  # another kind
    "prefill-g4-d64-pg16",  # a prefill of another head dim
    "not-a-class",  # not a class at all
])
def test_lookup_other_kind_or_shape_is_none(cache_dir, cls):
    write_cache(cache_dir, {"cpu": {DECODE_P128: entry(num_splits=4), "prefill-g4-d128-pg16": entry(64, 64)},
                            H100: {cls: entry(64, 64)}})  # another device's entry must not leak in
    assert configs.lookup_tuned(CPU, cls) is None


def test_fp8_pages_have_their_own_classes(cache_dir):
    """fp8 K/V pages key their own classes: a bf16 entry of the same shape is not taken for them (the H200's best
    bf16 decode config ran fp8 pages 1.5x slower than theirs), an fp8 one is, also at the nearest program count."""
    cls = configs.problem_class(32, 32, 16, 4, 128, 16, kv_fp8=True)
    assert cls == DECODE_P128 + "-fp8"
    assert configs.class_fields(cls)["fp8"] == "-fp8" and configs.class_fields(DECODE_P128)["fp8"] is None
    assert configs.problem_class(8192, 1, 32, 8, 128, 64, kv_fp8=True) == "prefill-g4-d128-pg64-fp8"
    args = (CPU, 32, 32, 16, 4, 128, 16)
    write_cache(cache_dir, {"cpu": {DECODE_P128: entry(16, 64, 3, 2, 4)}})
    assert configs.choose_config(*args, kv_fp8=True) == configs.default_config(*args[:-1], kv_fp8=True)
    assert configs.choose_config(*args) == AttentionConfig(16, 64, 3, 2, 4)
    write_cache(cache_dir, {"cpu": {DECODE_P128: entry(16, 64, 3, 2, 4),
                                    "decode-q1-p256-g4-d128-pg16-fp8": entry(16, 128, 2, 4, 3)}})
    assert configs.choose_config(*args, kv_fp8=True) == AttentionConfig(16, 128, 4, 4, 3)  # splits 2 * 256 / 128
    assert configs.choose_config(*args) == AttentionConfig(16, 64, 3, 2, 4)


def test_default_decode_tiles_on_fp8_pages(monkeypatch):
    """On a GPU, decode over fp8 pages takes 128-key tiles (measured on the H200), bf16 pages 64-key ones."""
    monkeypatch.setattr(configs, "multiprocessor_count", lambda device: 132)
    gpu = torch.device("cuda")
    assert configs.default_config(gpu, 64, 64, 32, 8, 128).tile_k == 64
    assert configs.default_config(gpu, 64, 64, 32, 8, 128, kv_fp8=True).tile_k == 128
    assert configs.default_config(gpu, 64, 64, 32, 8, 256, kv_fp8=True).tile_k == 32  # large heads: unchanged


def test_choose_config_without_entry_is_the_default(cache_dir):
    write_cache(cache_dir, {"cpu": {"decode-q1-p128-g8-d128-pg16": entry(16, 128, 7)}})
    args = (CPU, 32, 32, 16, 4, 128)  # group 4: no entry of its shape
    assert configs.choose_config(*args, 16) == configs.default_config(*args)


def test_unreadable_cache_warns_and_is_ignored(cache_dir):
    (cache_dir / "attention_configs.json").write_text('{"cpu": {"decode-q1-p128-g4-d128-pg16": ')
    with pytest.warns(UserWarning, match="unreadable tuned-config cache"):
        tables = configs.load_tables()
    assert "cpu" not in tables
    assert tables[H100]["prefill-g4-d128-pg16"]["block_m"] == 128  # the shipped table still loads
    with pytest.warns(UserWarning, match="unreadable tuned-config cache"):
        assert configs.lookup_tuned(CPU, DECODE_P128) is None
    args = (CPU, 32, 32, 16, 4, 128)
    assert configs.choose_config(*args, 16) == configs.default_config(*args)


def test_user_cache_overlays_the_shipped_table(cache_dir, monkeypatch):
    monkeypatch.setattr(configs, "device_key", lambda device: H100)
    write_cache(cache_dir, {H100: {"decode-q1-p128-g4-d128-pg16": entry(16, 32, 7, 8, 3)}})
    assert configs.lookup_tuned(CPU, "decode-q1-p128-g4-d128-pg16") == AttentionConfig(16, 32, 7, 8, 3)
    # Classes the user did not tune still come from the shipped table.
    assert configs.lookup_tuned(CPU, "decode-q1-p128-g4-d128-pg64") == AttentionConfig(16, 64, 3, 4, 2)
    assert configs.lookup_tuned(CPU, "prefill-g4-d64-pg64") == AttentionConfig(64, 64, 1, 4, 2, tma=1)


def test_cache_entries_may_leave_out_defaulted_fields(cache_dir):
    """Entries written before a field with a default existed still load; unknown or missing required fields
    do not."""
    old = {"block_m": 16, "tile_k": 64, "num_splits": 2, "num_warps": 4, "num_stages": 3}
    write_cache(cache_dir, {"cpu": {DECODE_P128: old}})
    assert configs.lookup_tuned(CPU, DECODE_P128) == AttentionConfig(16, 64, 2, 4, 3, page_lookahead=0)
    for bad in ({**old, "unroll": 2}, {"tile_k": 64}, {**old, "page_lookahead": True}):
        write_cache(cache_dir, {"cpu": {DECODE_P128: bad}})
        with pytest.warns(UserWarning, match="malformed entries"):
            assert configs.lookup_tuned(CPU, DECODE_P128) is None


def test_missing_cache_file_is_fine(cache_dir):
    assert not (cache_dir / "attention_configs.json").exists()
    assert configs._table_choice("cpu").own == {}
    assert configs.lookup_tuned(CPU, DECODE_P128) is None


# --- where the cache lives, what the device is called ---


def test_user_cache_path_prefers_tritium_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITIUM_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert configs.user_cache_path() == tmp_path / "mine" / "attention_configs.json"


def test_user_cache_path_uses_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITIUM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert configs.user_cache_path() == tmp_path / "xdg" / "tritium" / "attention_configs.json"
    monkeypatch.setenv("TRITIUM_CACHE_DIR", "")  # empty: as if unset
    assert configs.user_cache_path() == tmp_path / "xdg" / "tritium" / "attention_configs.json"


def test_user_cache_path_falls_back_to_home(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITIUM_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert configs.user_cache_path() == tmp_path / ".cache" / "tritium" / "attention_configs.json"


def test_device_key_on_cpu():
    assert configs.device_key(CPU) == "cpu"


# --- choose_config on the CPU ---


@pytest.mark.parametrize("group", [1, 2, 3, 4, 6, 8, 16, 32])
@pytest.mark.parametrize("num_tokens, num_seqs", [(1, 1), (8, 8), (16, 4), (40, 2), (600, 2)])
def test_choose_config_on_cpu_is_valid(cache_dir, group, num_tokens, num_seqs):
    num_kv_heads = 2
    config = configs.choose_config(CPU, num_tokens, num_seqs, group * num_kv_heads, num_kv_heads, 64, 16)
    assert config.block_m >= group
    config.validate(group)
    assert 1 <= config.num_splits <= 32


# --- the shipped table ---


def test_shipped_table_is_valid():
    tables = json.loads(resources.files("tritium.ops.attention").joinpath("tuned_configs.json").read_text())
    assert tables, "the shipped table is empty"
    names = {f.name for f in fields(AttentionConfig)}
    # Entries tuned before a field existed omit it and take its default (fp8_dot: tables predate fp8 dots).
    required = {f.name for f in fields(AttentionConfig) if f.default is MISSING}
    count = 0
    for key, classes in tables.items():
        assert key != "cpu"
        for cls, values in classes.items():
            m = configs._CLASS.fullmatch(cls)
            assert m is not None, f"{key}: {cls} is not a problem class"
            assert (m["p"] is not None) == m["kind"].startswith("decode"), cls
            assert required <= set(values) <= names, f"{key}: {cls}: fields {sorted(values)}"
            config = AttentionConfig(**values)
            config.validate(int(m["shape"].split("-")[0][1:]))
            assert config.num_splits <= 32, f"{cls}: more splits than lookup_tuned ever scales to"
            head_dim = int(m["shape"].split("-")[1][1:])
            assert head_dim == triton.next_power_of_2(head_dim), cls
            count += 1
    assert count >= 1


# --- a device with no table of its own takes its sibling's ---


def test_sibling_fallback_scales_splits_by_multiprocessors(cache_dir, monkeypatch):
    """A fake device key of the H100's architecture with no entries takes the H100's entries, split counts scaled by
    the multiprocessor ratio; with entries of its own it takes those."""
    fake = "nvidia:NVIDIA H100 Fake:cc90:sm66"  # half the H100's multiprocessors
    monkeypatch.setattr(configs, "device_key", lambda device: fake)
    sibling = {DECODE_P128: entry(16, 32, 8, 4, 3), "prefill-g4-d128-pg16": entry(128, 64)}
    write_cache(cache_dir, {H100: sibling})
    choice = configs.table_choice(CPU)
    assert (choice.source, choice.sibling_key, choice.sm_ratio) == ("sibling", H100, 0.5)
    assert configs.lookup_tuned(CPU, DECODE_P128) == AttentionConfig(16, 32, 4, 4, 3)
    assert configs.lookup_tuned(CPU, "prefill-g4-d128-pg16") == AttentionConfig(128, 64)  # never split
    write_cache(cache_dir, {H100: sibling, fake: {DECODE_P128: entry(16, 64, 3)}})
    assert configs.table_choice(CPU).source == "own"
    assert configs.lookup_tuned(CPU, DECODE_P128) == AttentionConfig(16, 64, 3)
    # A class the device's own entries lack still comes from the sibling (an exact class before a near one).
    assert configs.lookup_tuned(CPU, "prefill-g4-d128-pg16") == AttentionConfig(128, 64)


def test_other_architecture_derives(cache_dir, monkeypatch):
    monkeypatch.setattr(configs, "device_key", lambda device: "nvidia:NVIDIA B200:cc100:sm148")
    assert configs.table_choice(CPU).source == "derived"
    assert configs.lookup_tuned(CPU, "prefill-g4-d128-pg16") is None
