"""`tritium tune`'s parts that run without a GPU (tritium/bench/tune.py): the precompile jobs, the worker that
compiles them, and the pool's failure being only a warning."""

import pytest
import torch

from tritium.bench import tune
from tritium.bench.scenarios import Scenario, load_scenarios
from tritium.ops.attention import AttentionConfig
from tritium.ops.attention.configs import default_config

CPU = torch.device("cpu")


def test_compile_jobs_cover_each_class_first_candidates_once_in_chunks():
    classes = tune.problem_classes(load_scenarios(), page_size=16)
    jobs = tune.compile_jobs(classes, 16, torch.bfloat16, CPU)
    assert all((job.page_size, job.dtype, job.device) == (16, torch.bfloat16, "cpu") for job in jobs)
    for cls, members in classes.items():
        sc = members[0]
        splits = default_config(CPU, sum(q for q, _ in sc.seqs), len(sc.seqs), sc.num_q_heads, sc.num_kv_heads,
                                sc.head_size).num_splits
        timed = tune.candidates(cls, sc.num_q_heads // sc.num_kv_heads, sc.head_size, splits)
        assert tune.first_candidates(cls, members, CPU) == timed

        own = [job for job in jobs if job.members == tuple(members)]
        compiled = [c for job in own for c in job.configs]
        assert compiled == timed and len(set(compiled)) == len(compiled)
        sizes = [len(job.configs) for job in own]
        assert sizes[:-1] == [tune.CONFIGS_PER_JOB] * (len(sizes) - 1) and 0 < sizes[-1] <= tune.CONFIGS_PER_JOB
    assert sum(len(job.configs) for job in jobs) == sum(len(tune.first_candidates(c, m, CPU))
                                                        for c, m in classes.items())
    # chunk by chunk across the classes: the first jobs are one of each class
    assert [job.members for job in jobs[:len(classes)]] == [tuple(m) for m in classes.values()]


def test_compile_job_launches_every_config_on_every_member_and_skips_failures(monkeypatch):
    members = (Scenario("one decode", 32, 1, 16, ((1, 20),)),
               Scenario("two decodes, windowed", 32, 1, 16, ((1, 9), (1, 5)), sliding_window=4))
    fits, too_small, split = AttentionConfig(32, 16), AttentionConfig(16, 16), AttentionConfig(32, 32, num_splits=2)
    launched = []
    real = tune.unified_attention

    def recording(*args, config):
        launched.append((config, args[0].shape[0]))
        return real(*args, config=config)

    monkeypatch.setattr(tune, "unified_attention", recording)
    job = tune.CompileJob(members, (fits, too_small, split), page_size=4, dtype=torch.float16, device="cpu")
    assert tune.compile_job(job) == 2  # block_m 16 is below the GQA group of 32: validate refuses it
    assert launched == [(fits, 1), (fits, 2), (too_small, 1), (split, 1), (split, 2)]


def test_precompile_runs_jobs_in_workers_and_a_failed_job_is_only_a_warning():
    good = Scenario("one decode", 32, 1, 16, ((1, 20),))
    bad = Scenario("query longer than its context", 4, 1, 16, ((5, 3),))  # random_paged_batch raises in the worker
    jobs = [tune.CompileJob((sc,), (AttentionConfig(32, 16),), page_size=4, dtype=torch.float16, device="cpu")
            for sc in (bad, good)]
    with pytest.warns(UserWarning, match=r"^1 of 2 compile jobs failed \(the first: ValueError"):
        tune.precompile(jobs)  # "1 of 2": the good job ran in a spawned worker, so it and compile_job pickle
