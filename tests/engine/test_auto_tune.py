"""The engine's auto-tune (tritium/engine/auto_tune.py) on the CPU, with a stub timer: which classes it tunes, its
time budget, the cache that makes a second start tune nothing, and the reference check of the winners."""

import json

import pytest
import torch

from tritium.engine import auto_tune as at
from tritium.ops.attention import AttentionConfig, configs, tuning

CPU = torch.device("cpu")
# An engine of one sequence and two tokens a step: its steps fall in decode-q1 and decode-q2 (2 KV heads: p2).
SHAPE = dict(max_num_batched_tokens=2, max_num_seqs=1, num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=4,
             max_model_len=24)
CLASSES = ["decode-q1-p2-g2-d16-pg4", "decode-q2-p2-g2-d16-pg4"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITIUM_CACHE_DIR", str(tmp_path))
    configs.reload_tables()
    yield tmp_path / "attention_configs.json"
    configs.reload_tables()


@pytest.fixture
def stub_timer(monkeypatch):
    """Times no kernel: 32-key tiles on 2 warps with 2 splits are 'fastest'; every timed config is recorded."""
    timed = []

    def fake(fn):
        config = fn.__defaults__[1]  # the tuner times `lambda a=args, c=config: ...`
        timed.append(config)
        return 1.0 + (config.tile_k != 32) + (config.num_warps != 2) + (config.num_splits != 2) + config.num_stages / 10
    monkeypatch.setattr(tuning, "_time", fake)
    return timed


class Clock:
    """A clock that moves 10 s each time it is read."""

    def __init__(self) -> None:
        self.now = -10.0

    def __call__(self) -> float:
        self.now += 10.0
        return self.now


def test_missing_classes_are_the_steps_classes_the_own_table_lacks(cache):
    found = at.missing_classes(CPU, **SHAPE)
    assert list(found) == CLASSES
    (problem,) = found[CLASSES[1]]  # the short and the long context are both capped at max_model_len: one problem
    assert problem.seqs == ((2, 24),) and (problem.num_q_heads, problem.num_kv_heads) == (4, 2)
    long = at.missing_classes(CPU, **{**SHAPE, "max_model_len": 10000})[CLASSES[0]]
    assert [p.seqs for p in long] == [((1, 1024),), ((1, 8192),)]
    cache.write_text(json.dumps({"cpu": {CLASSES[0]: {"block_m": 16, "tile_k": 16}}}))
    configs.reload_tables()
    assert list(at.missing_classes(CPU, **SHAPE)) == CLASSES[1:]
    # Many sequences and a large budget reach mixed and prefill classes; single-token decodes come first.
    wide = at.missing_classes(CPU, **{**SHAPE, "max_num_batched_tokens": 600, "max_num_seqs": 4})
    kinds = [configs.class_fields(c)["kind"] for c in wide]
    assert kinds[:4] == ["decode-q1", "decode-q1", "mixed", "prefill"]  # p2's is in the table; p4 and p8 are not
    assert set(kinds[4:]) == {"decode-q2", "decode-q4", "decode-q8"}
    assert wide[next(c for c in wide if c.startswith("prefill"))][0].seqs == ((24, 24),)  # capped by the length


def test_budget_then_cache_then_nothing_left(cache, stub_timer):
    # 10 s pass before the first class, 20 before the second: a 15 s budget tunes one class.
    first = at.auto_tune(CPU, torch.float32, **SHAPE, budget_s=15, clock=Clock())
    assert list(first) == CLASSES[:1]
    best = AttentionConfig(**first[CLASSES[0]])
    assert (best.tile_k, best.num_warps, best.num_splits) == (32, 2, 2)  # the stub timer's favourite
    assert json.loads(cache.read_text()) == {"cpu": first}
    assert configs.lookup_tuned(CPU, CLASSES[0]) == best  # the kernel reads it at once

    second = at.auto_tune(CPU, torch.float32, **SHAPE, budget_s=15, clock=Clock())
    assert list(second) == CLASSES[1:]  # only what the first start left
    stub_timer.clear()
    assert at.auto_tune(CPU, torch.float32, **SHAPE, budget_s=15, clock=Clock()) == {}  # a third start tunes nothing
    assert stub_timer == []


def test_fp8_pages_tune_their_own_classes_on_fp8_batches(cache, stub_timer, monkeypatch):
    """An engine on fp8 pages tunes the `-fp8` classes, timing batches whose pages are fp8, and caches them apart
    from the model dtype's classes, which stay missing."""
    seen = []
    real = tuning.random_paged_batch
    monkeypatch.setattr(tuning, "random_paged_batch", lambda *a, **k: seen.append(k.get("kv_dtype")) or real(*a, **k))
    fp8 = torch.float8_e4m3fn
    assert list(at.missing_classes(CPU, **SHAPE, kv_fp8=True)) == [c + "-fp8" for c in CLASSES]
    tuned = at.auto_tune(CPU, torch.float32, **SHAPE, kv_fp8=True, budget_s=100, clock=Clock())
    assert list(tuned) == [c + "-fp8" for c in CLASSES]
    assert seen and set(seen) == {fp8}
    assert set(json.loads(cache.read_text())["cpu"]) == set(tuned)
    assert list(at.missing_classes(CPU, **SHAPE)) == CLASSES


def test_a_winner_off_the_reference_is_refused(cache, stub_timer, monkeypatch):
    """The winners are checked against the reference as `tritium tune` checks them."""
    real = tuning.unified_attention

    def wrong(*args, config):
        out = real(*args, config=config)
        args[3].mul_(2.0)  # every launch's output doubled
        return out
    monkeypatch.setattr(tuning, "unified_attention", wrong)
    with pytest.raises(RuntimeError, match="off the reference"):
        at.auto_tune(CPU, torch.float32, **SHAPE)
    assert not cache.exists()


def test_switched_off_by_setting_or_environment(monkeypatch):
    monkeypatch.delenv("TRITIUM_AUTO_TUNE", raising=False)  # (tests/conftest.py sets it for every other test)
    assert at.auto_tune_enabled(True)
    assert not at.auto_tune_enabled(False)
    monkeypatch.setenv("TRITIUM_AUTO_TUNE", "0")
    assert not at.auto_tune_enabled(True)
