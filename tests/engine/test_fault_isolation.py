"""A fault while handling one request ends that request alone (finish_reason "error", its pages freed) and the
others' tokens are those they get alone; a fault that is the engine's marks it dead and fails every request."""

import pytest
import torch

import tritium.engine.llm_engine as llm_engine
import tritium.engine.model_runner as model_runner
from tritium import LLM, SamplingParams, default_model_path
from tritium.engine.config import EngineConfig
from tritium.engine.errors import EngineDeadError, RequestFailed
from tritium.engine.llm_engine import LLMEngine
from tritium.engine.tokenizer import IncrementalDetokenizer

INNOCENT = [("The for statement", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)),
            ("A while loop", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, n=2)),
            ("Hello", SamplingParams(temperature=0.9, seed=7, max_tokens=8, ignore_eos=True)),
            ("import os", SamplingParams(temperature=1.2, top_k=20, seed=11, max_tokens=8, ignore_eos=True, n=2))]
MARKED = SamplingParams(temperature=0.8, seed=4242, max_tokens=8, ignore_eos=True)  # the request made to fail


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(default_model_path(), EngineConfig(max_model_len=128))


@pytest.fixture(scope="module")
def alone(engine):
    """Each innocent request's tokens when it runs by itself."""
    return [_run(engine, [(text, params)])[0] for text, params in INNOCENT]


def _run(engine: LLMEngine, requests, marked_text: str | None = None) -> list[list[list[int]]]:
    """Add the requests (and the marked one, second, when given) and step to the end; each request's samples'
    tokens, in order (the marked one left out)."""
    seqs = []
    for i, (text, params) in enumerate(requests):
        seqs.append(engine.add_request(engine.tokenizer.encode(text), params, f"r{i}"))
        if i == 0 and marked_text is not None:
            seqs.append(engine.add_request(engine.tokenizer.encode(marked_text), MARKED, "marked"))
    while engine.has_unfinished():
        engine.step()
    assert engine.pages.num_free == engine.pages.num_pages and not engine.runner.generators
    return [[s.output_ids for s in request] for request in seqs if request[0].request_id != "marked"]


def _marked(engine: LLMEngine):
    return [s for s in engine.scheduler.running if s.request_id == "marked"]


def test_a_detokenizer_that_fails_ends_its_request_alone(engine, alone, monkeypatch):
    failed = []
    step = engine.step

    def step_with_a_broken_detokenizer():
        for seq in _marked(engine):
            if len(seq.output_ids) == 2:  # its third token's text raises
                seq.detokenizer.add = lambda token: 1 / 0
        finished = step()
        failed.extend(s for s in finished if s.request_id == "marked")
        return finished

    monkeypatch.setattr(engine, "step", step_with_a_broken_detokenizer)
    assert _run(engine, INNOCENT, "def f(x):") == alone
    (seq,) = failed
    assert seq.finish_reason == "error" and "ZeroDivisionError" in seq.error and len(seq.output_ids) == 3


def test_a_batched_step_that_fails_for_one_request_is_split_until_that_request_alone_fails(engine, alone,
                                                                                            monkeypatch):
    sample, calls = model_runner.sample, []

    def sample_refusing_the_marked(logits, params, generators, **kwargs):
        calls.append(len(params))
        if any(p.seed == MARKED.seed for p in params):
            raise ValueError("this request's values break the batch")
        return sample(logits, params, generators, **kwargs)

    monkeypatch.setattr(model_runner, "sample", sample_refusing_the_marked)
    assert _run(engine, INNOCENT, "def f(x):") == alone
    assert 1 in calls and max(calls) > 1  # the batch ran whole, then in parts down to the marked request alone


def test_a_set_up_that_fails_refuses_its_request_and_queues_nothing(engine, alone, monkeypatch):
    made = []

    def detokenizer_failing_for_the_second_sample(tokenizer, prompt_ids):
        made.append(prompt_ids)
        if len(made) == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "the set-up failed")
        return IncrementalDetokenizer(tokenizer, prompt_ids)

    monkeypatch.setattr(llm_engine, "IncrementalDetokenizer", detokenizer_failing_for_the_second_sample)
    with pytest.raises(RequestFailed, match="the set-up failed"):
        engine.add_request([1, 2, 3], SamplingParams(**{**MARKED.__dict__, "n": 2}), "marked")
    monkeypatch.undo()
    assert not engine.has_unfinished()
    assert _run(engine, INNOCENT) == alone


@pytest.mark.parametrize("fault", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                                   torch.OutOfMemoryError("CUDA out of memory"), EngineDeadError("rank 1 died"),
                                   ValueError("every request fails, even alone")])
def test_an_engine_fault_marks_the_engine_dead_and_fails_every_request(fault, monkeypatch):
    engine = LLMEngine(default_model_path(), EngineConfig(max_model_len=128))
    seqs = [s for i, (text, params) in enumerate(INNOCENT)
            for s in engine.add_request(engine.tokenizer.encode(text), params, f"r{i}")]
    engine.step()

    def broken(*args, **kwargs):
        raise fault

    monkeypatch.setattr(engine.runner, "step", broken)
    with pytest.raises(EngineDeadError) as info:
        engine.step()
    assert engine.dead is info.value and (info.value is fault or str(fault) in str(info.value))
    assert all(s.finish_reason == "error" and str(fault) in s.error for s in seqs)
    assert not engine.has_unfinished() and engine.pages.num_free == engine.pages.num_pages
    with pytest.raises(EngineDeadError):
        engine.add_request([1, 2], INNOCENT[0][1], "late")
    with pytest.raises(EngineDeadError):
        engine.step()


def test_llm_generate_reports_a_failed_request_and_returns_the_others(monkeypatch):
    llm = LLM(default_model_path(), max_model_len=128)
    record = llm_engine.record_token

    def record_refusing_the_marked(seq, token, logprobs, rank, eos_ids):
        if seq.params.seed == MARKED.seed:
            raise RuntimeError("injected")
        return record(seq, token, logprobs, rank, eos_ids)

    monkeypatch.setattr(llm_engine, "record_token", record_refusing_the_marked)
    outs = llm.generate(["The for statement", "def f(x):"], [INNOCENT[0][1], MARKED], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "length" and outs[0].outputs[0].error is None
    assert outs[1].outputs[0].finish_reason == "error" and "injected" in outs[1].outputs[0].error
    with pytest.raises(RequestFailed, match="injected"):
        list(llm.stream("def f(x):", MARKED))
    with pytest.raises(ValueError, match="prompt 1 is not valid Unicode"):
        llm.generate(["fine", "bad \ud800"], use_tqdm=False)
    pieces = llm.stream("Hello", INNOCENT[0][1])
    next(pieces)
    pieces.close()  # a reader that stops leaves nothing running
    assert not llm.engine.has_unfinished() and llm.engine.pages.num_free == llm.engine.pages.num_pages
