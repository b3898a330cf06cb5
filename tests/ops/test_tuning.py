"""`tritium tune`'s parts that run without a GPU (tritium/bench/tuning.py): the precompile jobs, the worker that
compiles them, and the pool's failure being only a warning."""

import math
from dataclasses import replace

import pytest
import torch

from tritium.bench.scenarios import Scenario, load_scenarios
from tritium.ops.attention import AttentionConfig, tuning
from tritium.ops.attention.configs import default_config

CPU = torch.device("cpu")


def test_compile_jobs_cover_each_class_first_candidates_once_in_chunks():
    classes = tuning.problem_classes(load_scenarios(), page_size=16)
    jobs = tuning.compile_jobs(classes, 16, torch.bfloat16, CPU)
    assert all((job.page_size, job.dtype, job.device) == (16, torch.bfloat16, "cpu") for job in jobs)
    for cls, members in classes.items():
        sc = members[0]
        splits = default_config(CPU, sum(q for q, _ in sc.seqs), len(sc.seqs), sc.num_q_heads, sc.num_kv_heads,
                                sc.head_size).num_splits
        timed = tuning.candidates(cls, sc.num_q_heads // sc.num_kv_heads, sc.head_size, splits)
        assert tuning.first_candidates(cls, members, CPU) == timed

        own = [job for job in jobs if job.members == tuple(members)]
        compiled = [c for job in own for c in job.configs]
        assert compiled == timed and len(set(compiled)) == len(compiled)
        sizes = [len(job.configs) for job in own]
        assert sizes[:-1] == [tuning.CONFIGS_PER_JOB] * (len(sizes) - 1) and 0 < sizes[-1] <= tuning.CONFIGS_PER_JOB
    assert sum(len(job.configs) for job in jobs) == sum(len(tuning.first_candidates(c, m, CPU))
                                                        for c, m in classes.items())
    # chunk by chunk across the classes: the first jobs are one of each class
    assert [job.members for job in jobs[:len(classes)]] == [tuple(m) for m in classes.values()]


@pytest.mark.parametrize("page", [16, 64, 128])
def test_descriptor_candidates_only_where_a_tile_fits_a_page(page):
    plain = tuning.candidates(f"prefill-g4-d128-pg{page}", 4, 128, 1)
    with_tma = tuning.candidates(f"prefill-g4-d128-pg{page}", 4, 128, 1, tma=True)
    assert all(c.tma == 0 for c in plain)
    assert [c for c in with_tma if c.tma == 0] == plain
    assert [replace(c, tma=0) for c in with_tma if c.tma] == [c for c in plain if page % c.tile_k == 0]
    assert any(c.tma for c in with_tma) == (page >= 32)
    decode = tuning.candidates(f"decode-q1-p128-g4-d128-pg{page}", 4, 128, 3, tma=True)
    assert decode == tuning.candidates(f"decode-q1-p128-g4-d128-pg{page}", 4, 128, 3)  # pointer loads only


def test_compile_job_launches_every_config_on_every_member_and_skips_failures(monkeypatch):
    members = (Scenario("one decode", 32, 1, 16, ((1, 20),)),
               Scenario("two decodes, windowed", 32, 1, 16, ((1, 9), (1, 5)), sliding_window=4))
    fits, too_small, split = AttentionConfig(32, 16), AttentionConfig(16, 16), AttentionConfig(32, 32, num_splits=2)
    launched = []
    real = tuning.unified_attention

    def recording(*args, config):
        launched.append((config, args[0].shape[0]))
        return real(*args, config=config)

    monkeypatch.setattr(tuning, "unified_attention", recording)
    job = tuning.CompileJob(members, (fits, too_small, split), page_size=4, dtype=torch.float16, device="cpu")
    assert tuning.compile_job(job) == 2  # block_m 16 is below the GQA group of 32: validate refuses it
    # one-token launches, one per member: what compiles, not what is timed
    assert launched == [(fits, 1), (fits, 1), (too_small, 1), (split, 1), (split, 1)]


def _specialisation(args: tuple) -> list:
    """What Triton's compiled variant of a launch depends on among its arguments: dtypes, trailing shapes and
    strides of the tensors (the block table's row stride by class: 1, a multiple of 16, or neither), and the
    values of the others but the runtime lengths (max_seqlen_q, max_seqlen_k)."""
    out = []
    for i, a in enumerate(args):
        if i == 11:  # block_table
            out.append((a.dtype, a.stride(0) == 1, a.stride(0) % 16 == 0))
        elif isinstance(a, torch.Tensor):
            out.append((a.dtype, tuple(a.shape[1:]), a.stride()[1:] if i in (4, 6) else a.stride()))
        elif i not in (5, 7):
            out.append(a)
    return out


@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("seqs", [((1, 3),), ((1, 40), (1, 9)), ((5, 64),), ((70, 70), (1, 30)), ((2, 200),)])
@pytest.mark.parametrize("window", [None, 8])
def test_compile_args_specialise_as_the_scenario_does(page_size, seqs, window):
    sc = Scenario("s", 8, 2, 32, seqs, sliding_window=window)
    real = tuning._runs([sc], page_size, torch.float16, "cpu")[0][2]
    small = tuning.compile_args(sc, page_size, torch.float16, "cpu")
    assert small[0].shape[0] == 1
    assert _specialisation(small) == _specialisation(real)


def test_compile_args_cover_the_suite_without_its_memory():
    """The suite's largest scenario (decode b32 at 32k context) compiles from a few kilobytes."""
    for page_size in (16, 64):
        for sc in load_scenarios():
            args = tuning.compile_args(sc, page_size, torch.bfloat16, "cpu")
            assert sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor)) < 2**20
            width = max(-(-ctx // page_size) for _, ctx in sc.seqs)
            assert (args[11].stride(0) % 16 == 0) == (width % 16 == 0)


def test_precompile_runs_jobs_in_workers_and_a_failed_job_is_only_a_warning():
    sc = Scenario("one decode", 32, 1, 16, ((1, 20),))
    # page size 0: building the job's launch raises in the worker (outside the per-config try)
    jobs = [tuning.CompileJob((sc,), (AttentionConfig(32, 16),), page_size=page, dtype=torch.float16, device="cpu")
            for page in (0, 4)]
    with pytest.warns(UserWarning, match=r"^1 of 2 compile jobs failed \(the first: ZeroDivisionError"):
        tuning.precompile(jobs)  # "1 of 2": the good job ran in a spawned worker, so it and compile_job pickle


def test_search_ranks_by_geomean_relative_time_and_keeps_the_best_few(monkeypatch):
    a, b, c, d = (AttentionConfig(16, t) for t in (16, 32, 64, 128))
    # ms per config on two runs; d fails (inf) on the second; b is best on geomean though a is faster on run 0
    table = {a: (1.0, 4.0), b: (1.2, 2.0), c: (2.0, 2.1), d: (0.5, math.inf)}
    current = []
    monkeypatch.setattr(tuning, "unified_attention", lambda *args, config: current.append(config))
    monkeypatch.setattr(tuning, "_time", lambda fn: (fn(), table[current[-1]][len(current) % 2 == 0])[1])
    runs = [(None, None, ()), (None, None, ())]
    top, best_ms = tuning._search(runs, [a, b, c, d], keep=3)
    assert top == [b, a, c] and best_ms == [1.2, 2.0]  # geomeans vs (0.5, 2.0): 1.55, 2.0, 2.05
    assert tuning._search(runs, [a, b, c, d])[0] == [b]
