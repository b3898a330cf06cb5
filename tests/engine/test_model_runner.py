"""Decodes launched ahead (the scheduler decides, the ModelRunner launches): the next decode is queued before the
current tokens are read back, and taken by the next step. It must never change what is generated: greedy and seeded
outputs equal a run with nothing launched ahead, through stop tokens, a request arriving mid-run and an abort."""

import pytest
import torch

from tests.models.helpers import save_family
from tritium.engine.config import EngineConfig
from tritium.engine.llm_engine import LLMEngine
from tritium.engine.model_runner import ModelRunner
from tritium.engine.sampling_params import SamplingParams
from tritium.engine.scheduler import Scheduler


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3")
    save_family("llama3", path)
    return path


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 96, (int(k),), generator=g).tolist() for k in torch.randint(2, 14, (n,), generator=g)]


def _run(path, requests, run_ahead: bool, monkeypatch, arrive_at: int = 3, abort_at: int = 5) -> tuple[dict, dict]:
    """Generate `requests` (prompt, params), the last one added at step `arrive_at` and request "1" aborted at
    step `abort_at`; returns ({request: (tokens, finish reason)}, {"steps": ..., "launches": ...})."""
    with monkeypatch.context() as m:
        if not run_ahead:
            m.setattr(Scheduler, "_ahead", lambda self, batch: [])
        launches = []
        launch = ModelRunner._launch
        m.setattr(ModelRunner, "_launch", lambda self, plan, out: launches.append(1) or launch(self, plan, out))
        engine = LLMEngine(path, EngineConfig(skip_tokenizer_init=True, block_size=4))
        seqs = []
        for i, (prompt, params) in enumerate(requests[:-1]):
            seqs += engine.add_request(prompt, params, str(i))
        steps = 0
        while engine.has_unfinished() or steps <= arrive_at:
            if steps == arrive_at:
                seqs += engine.add_request(*requests[-1], str(len(requests) - 1))
            if steps == abort_at:
                engine.abort("1")
            engine.step()
            steps += 1
        assert engine.pages.num_free == engine.pages.num_pages  # the reserved pages came back too
    outputs = {s.request_id: (s.output_ids, s.finish_reason) for s in seqs}
    return outputs, {"steps": steps, "launches": len(launches)}


def test_run_ahead_changes_no_output(model_dir, monkeypatch):
    prompts = _prompts(5)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain, _ = _run(model_dir, [(p, greedy) for p in prompts], False, monkeypatch)
    # Request 0 stops on a token it generates early; the others mix greedy and seeded sampling, lengths differ.
    stop = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[plain["0"][0][2]])
    requests = [(prompts[0], stop)]
    requests += [(p, SamplingParams(temperature=0.8, seed=i, max_tokens=6 + 3 * i, ignore_eos=True))
                 for i, p in enumerate(prompts[1:3], start=1)]
    requests += [(p, greedy) for p in prompts[3:]]
    expected, _ = _run(model_dir, requests, False, monkeypatch)
    got, counts = _run(model_dir, requests, True, monkeypatch)

    assert got == expected
    assert got["0"][1] == "stop" and len(got["0"][0]) <= 3
    assert got["1"][1] == "abort"
    # Most steps took the decode launched ahead: only prefills (and the arrival's) launched their own forward.
    assert counts["launches"] <= counts["steps"] // 2, counts


def test_engine_serves_after_an_unused_run_ahead(model_dir):
    prompt, other = _prompts(2)
    engine = LLMEngine(model_dir, EngineConfig(skip_tokenizer_init=True, block_size=4))
    first = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    while engine.has_unfinished():
        engine.step()
    # Ended by a token launched-ahead decodes could not foresee: one is left in flight for a sequence now gone.
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first.output_ids[3]]))
    while engine.has_unfinished():
        engine.step()
    assert engine.runner.ahead is not None
    seq = engine.add_request(other, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    while engine.has_unfinished():
        engine.step()

    fresh = LLMEngine(model_dir, EngineConfig(skip_tokenizer_init=True, block_size=4))
    alone = fresh.add_request(other, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    while fresh.has_unfinished():
        fresh.step()
    assert seq.output_ids == alone.output_ids
    assert engine.pages.num_free == engine.pages.num_pages
