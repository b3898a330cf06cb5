"""The kernel benchmark suite (tritium/bench/scenarios.py): loading, and the cost model checked by brute force."""

import json
from importlib import resources

import pytest

from tritium.bench.scenarios import Scenario, load_scenarios


def brute_visible(seqs, window: int | None) -> list[set[tuple[int, int]]]:
    """Per sequence, the (query position, key position) pairs a query may see: bottom-right causal, and with a
    window W the query's W most recent keys, itself included."""
    found = []
    for q_len, ctx in seqs:
        pairs = set()
        for i in range(q_len):
            pos = ctx - q_len + i
            for key in range(ctx):
                if key <= pos and (window is None or pos - key < window):
                    pairs.add((pos, key))
        found.append(pairs)
    return found


HAND_MADE = [
    ((1, 1),),
    ((1, 17), (1, 5), (1, 64)),  # decodes
    ((7, 7),),  # prefill
    ((5, 5), (16, 16), (3, 3)),
    ((4, 20), (9, 30), (1, 1)),  # chunks on prefixes
    ((2, 40), (3, 33), (1, 12), (12, 12)),  # spec decodes, a decode, a prefill
    ((0, 10), (6, 9)),  # a sequence with no new tokens
]
WINDOWS = [None, 1, 2, 3, 5, 8, 100]


def scenario(seqs, window=None, num_q_heads=8, num_kv_heads=2, head_size=64) -> Scenario:
    return Scenario("hand-made", num_q_heads, num_kv_heads, head_size, tuple(seqs), window)


def test_load_scenarios_matches_json():
    data = json.loads(resources.files("tritium.bench").joinpath("scenarios.json").read_text())["scenarios"]
    suite = load_scenarios()
    assert len(suite) == len(data) == 13
    assert [s.name for s in suite] == [d["name"] for d in data]
    assert len({s.name for s in suite}) == 13
    for sc, d in zip(suite, data, strict=True):
        assert (sc.num_q_heads, sc.num_kv_heads, sc.head_size) == (d["num_q_heads"], d["num_kv_heads"],
                                                                   d["head_size"])
        assert sc.sliding_window == d.get("sliding_window")
        assert len(sc.seqs) == sum(g["count"] for g in d["sequences"])
        assert sorted(set(sc.seqs)) == sorted({(g["query_len"], g["context_len"]) for g in d["sequences"]})
        assert all(1 <= q <= ctx for q, ctx in sc.seqs)


def test_load_scenarios_expands_groups_in_order():
    suite = {s.name: s for s in load_scenarios()}
    mixed = suite["mixed 2k-chunk + 127 decodes ctx2k"]
    assert mixed.seqs == ((2048, 2048),) + ((1, 2048),) * 127
    assert not mixed.is_decode
    assert suite["decode b16 ctx4k"].seqs == ((1, 4096),) * 16 and suite["decode b16 ctx4k"].is_decode
    assert suite["decode b64 ctx4k sliding 1k"].sliding_window == 1024
    assert suite["decode b64 ctx4k sliding 1k"].window_size == (1023, 0)
    assert suite["prefill 1x8k"].window_size == (-1, -1)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("seqs", HAND_MADE)
def test_visible_pairs_brute_force(seqs, window):
    sc = scenario(seqs, window)
    expected = sum(len(p) for p in brute_visible(seqs, window))
    assert sc.visible_pairs() == expected
    assert isinstance(sc.visible_pairs(), int)


def test_visible_pairs_known_values():
    assert scenario(((4, 4),)).visible_pairs() == 10  # 1 + 2 + 3 + 4
    assert scenario(((2, 10),)).visible_pairs() == 19  # 9 + 10
    assert scenario(((4, 4),), window=2).visible_pairs() == 7  # 1 + 2 + 2 + 2
    assert scenario(((1, 4096),), window=1024).visible_pairs() == 1024


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("seqs", HAND_MADE)
def test_flops(seqs, window):
    sc = scenario(seqs, window, num_q_heads=12, num_kv_heads=4, head_size=96)
    pairs = sum(len(p) for p in brute_visible(seqs, window))
    assert sc.flops() == 4 * pairs * 96 * 12


@pytest.mark.parametrize("elem, kv_elem", [(2, 2), (4, 4), (2, 1)])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("seqs", [s for s in HAND_MADE if all(q >= 1 for q, _ in s)])
def test_bytes_brute_force(seqs, window, elem, kv_elem):
    sc = scenario(seqs, window, num_q_heads=8, num_kv_heads=2, head_size=32)
    tokens = sum(q for q, _ in seqs)
    keys = sum(len({key for _, key in pairs}) for pairs in brute_visible(seqs, window))
    expected = 2 * tokens * 8 * 32 * elem + 2 * keys * 2 * 32 * kv_elem
    assert sc.bytes(elem=elem, kv_elem=kv_elem) == expected


def test_bytes_formula():
    # No window: the whole context; window W: min(ctx, W + q - 1) keys.
    sc = scenario(((3, 50), (1, 10), (20, 20)), window=None, num_q_heads=4, num_kv_heads=1, head_size=16)
    assert sc.bytes() == 2 * 24 * 4 * 16 * 2 + 2 * 80 * 1 * 16 * 2
    sc = scenario(((3, 50), (1, 10), (20, 20)), window=8, num_q_heads=4, num_kv_heads=1, head_size=16)
    assert sc.bytes() == 2 * 24 * 4 * 16 * 2 + 2 * (10 + 8 + 20) * 1 * 16 * 2


def test_window_size():
    assert scenario(((1, 10),)).window_size == (-1, -1)
    assert scenario(((1, 10),), window=1).window_size == (0, 0)
    assert scenario(((1, 10),), window=1024).window_size == (1023, 0)


def test_is_decode():
    assert scenario(((1, 10), (1, 3))).is_decode
    assert not scenario(((1, 10), (2, 3))).is_decode


SHRINK_CASES = [
    ((1, 8192),) * 10,
    ((8192, 8192),),
    ((2048, 4096),) * 4,
    ((4, 2048),) * 64,
    ((5, 5), (6, 6), (300, 300), (1000, 1001), (3, 3), (2, 4096)),
    ((2048, 2048),) + ((1, 2048),) * 127,
]


@pytest.mark.parametrize("max_seqs", [1, 4, 8])
@pytest.mark.parametrize("factor", [1, 16, 64, 1024])
@pytest.mark.parametrize("seqs", SHRINK_CASES)
def test_shrunk_hand_made(seqs, factor, max_seqs):
    sc = scenario(seqs, window=None)
    small = sc.shrunk(factor=factor, max_seqs=max_seqs)
    assert len(small.seqs) == min(len(seqs), max_seqs)
    for (q, ctx), (small_q, small_ctx) in zip(seqs, small.seqs):  # the first max_seqs, in order
        assert 1 <= small_q <= small_ctx
        assert small_ctx <= max(ctx, 16)
        if q == 1:
            assert small_q == 1
        if q <= 4:
            assert small_q == q
    assert (small.name, small.num_q_heads, small.num_kv_heads, small.head_size) == (
        sc.name, sc.num_q_heads, sc.num_kv_heads, sc.head_size)


@pytest.mark.parametrize("sc", load_scenarios(), ids=lambda s: s.name)
def test_shrunk_suite(sc):
    small = sc.shrunk()
    assert 1 <= len(small.seqs) <= 4
    assert small.seqs == sc.shrunk(max_seqs=4).seqs
    assert all(1 <= q <= ctx for q, ctx in small.seqs)
    assert all(ctx <= 1024 for _, ctx in small.seqs), "a shrunk scenario is meant to be small"
    assert small.is_decode == sc.is_decode
    for (q, _), (small_q, _) in zip(sc.seqs, small.seqs):
        if q == 1:
            assert small_q == 1
    assert (small.sliding_window is None) == (sc.sliding_window is None)
    if sc.sliding_window is not None:
        assert 1 <= small.sliding_window <= sc.sliding_window


def test_shrunk_examples():
    suite = {s.name: s for s in load_scenarios()}
    assert suite["decode b1 ctx8k"].shrunk().seqs == ((1, 128),)
    assert suite["decode b256 ctx1k"].shrunk().seqs == ((1, 16),) * 4
    assert suite["prefill 4x2k on 2k prefix"].shrunk().seqs == ((32, 64),) * 4
    assert suite["spec q4 b64 ctx2k"].shrunk().seqs == ((4, 32),) * 4
    sliding = suite["decode b64 ctx4k sliding 1k"].shrunk()
    assert sliding.sliding_window == 16 and sliding.window_size == (15, 0)
    assert scenario(((1, 100),), window=100).shrunk().sliding_window == 8  # never below 8
