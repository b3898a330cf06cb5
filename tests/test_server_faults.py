"""Faults over HTTP: a request made to fail inside the engine step gets an error (an error event on its stream, an
error object otherwise) while the streams beside it end as they do alone; an engine fault answers 503 on /health,
fails the requests in flight, refuses new ones, and makes `tritium serve` exit non-zero."""

import asyncio
import json
import time

import httpx
import pytest

import tritium.engine.llm_engine as llm_engine
import tritium.engine.model_runner as model_runner
from tests.serving import MODEL, running_server, serve_process
from tritium import default_model_path
from tritium.engine.config import EngineConfig
from tritium.engine.llm_engine import LLMEngine
from tritium.server.app import build_app
from tritium.server.async_engine import AsyncEngine
from tritium.server.metrics import ServerMetrics

MARK = 4242  # the seed of the request made to fail
INNOCENTS = [{"model": MODEL, "prompt": p, "max_tokens": 24, "ignore_eos": True, "stream": True, **sampling}
             for p, sampling in [("The for statement", {"temperature": 0}), ("A while loop", {"temperature": 0}),
                                 ("import os", {"temperature": 0.8, "seed": 3}),
                                 ("Hello", {"temperature": 1.0, "top_k": 40, "seed": 5})]]
MARKED = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 24, "ignore_eos": True, "temperature": 0.7,
          "seed": MARK}


async def _events(client: httpx.AsyncClient, url: str, body: dict) -> list:
    """A stream's events, parsed, `data: [DONE]` as None."""
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        return [None if line == "data: [DONE]" else json.loads(line[6:])
                async for line in r.aiter_lines() if line.startswith("data: ")]


def _text(events: list) -> str:
    assert events[-1] is None and all("choices" in e for e in events[:-1]), events[-3:]
    return "".join(e["choices"][0]["text"] for e in events[:-1])


async def _with_marked(url: str) -> tuple[list, list, httpx.Response]:
    """The innocent streams, the marked request as a stream and whole, all at once."""
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(
            asyncio.gather(*(_events(client, url, b) for b in INNOCENTS)),
            _events(client, url, {**MARKED, "stream": True}),
            client.post(url + "/v1/completions", json=MARKED))


@pytest.fixture(scope="module")
def served():
    async def alone(url: str) -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            return [_text(await _events(client, url, body)) for body in INNOCENTS]

    with running_server(max_model_len=128) as (url, engine):
        yield url, engine, asyncio.run(alone(url))


@pytest.mark.parametrize("where", ["text of its third token", "batched sampling"])
def test_a_request_that_fails_in_the_step_fails_alone(served, where, monkeypatch):
    url, engine, alone = served
    if where == "batched sampling":
        sample = model_runner.sample

        def sample_refusing_the_marked(logits, params, generators, **kwargs):
            if any(p.seed == MARK for p in params):
                raise ValueError("injected: this request's values break the batch")
            return sample(logits, params, generators, **kwargs)

        monkeypatch.setattr(model_runner, "sample", sample_refusing_the_marked)
    else:
        record = llm_engine.record_token

        def record_refusing_the_marked(seq, token, logprobs, rank, eos_ids):
            if seq.params.seed == MARK and len(seq.output_ids) == 2:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
            return record(seq, token, logprobs, rank, eos_ids)

        monkeypatch.setattr(llm_engine, "record_token", record_refusing_the_marked)
    innocents, stream, whole = asyncio.run(_with_marked(url))
    assert [_text(events) for events in innocents] == alone
    error = stream[-2]["error"]
    assert stream[-1] is None and error["type"] == "server_error" and "injected" in error["message"]
    assert whole.status_code == 500 and "injected" in whole.json()["error"]["message"]
    assert not engine.engine.has_unfinished() and engine.engine.pages.num_free == engine.engine.pages.num_pages
    assert httpx.get(url + "/health").status_code == 200


def _die_on_the_marked(self, plan):
    if any(s.params.seed == MARK for s in plan.seqs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
    return _step(self, plan)


_step = model_runner.ModelRunner.step


def test_an_engine_fault_answers_503_fails_requests_in_flight_and_refuses_new_ones(monkeypatch):
    """Through the app (no listener, so /health can be read after the death at leisure)."""
    monkeypatch.setattr(model_runner.ModelRunner, "step", _die_on_the_marked)
    engine = AsyncEngine(LLMEngine(default_model_path(), EngineConfig(max_model_len=128)), ServerMetrics(MODEL))
    died = []
    engine.on_dead = died.append
    app = build_app(engine, ServerMetrics(MODEL), MODEL)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app", timeout=120) as c:
            body = {**INNOCENTS[0], "max_tokens": 100}
            stream = asyncio.create_task(c.post("/v1/completions", json=body))
            whole = asyncio.create_task(c.post("/v1/completions", json={**body, "stream": False}))
            deadline = time.monotonic() + 60  # a failure here fails the test, not the CI run's clock
            while len(engine.engine.scheduler.running) < 2:
                assert time.monotonic() < deadline and not stream.done(), "the innocent requests never ran"
                await asyncio.sleep(0.01)
            marked = await c.post("/v1/completions", json=MARKED)
            return await stream, await whole, marked, await c.get("/health"), await c.post(
                "/v1/completions", json=INNOCENTS[1])

    try:
        stream, whole, marked, health, late = asyncio.run(scenario())
    finally:
        engine.shutdown()
    events = [line[6:] for line in stream.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "illegal memory access" in json.loads(events[-2])["error"]["message"]
    for name, r in (("whole", whole), ("marked", marked), ("health", health), ("late", late)):
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error", (name, r.text)
    assert "the engine is dead" in health.json()["error"]["message"] and len(died) == 1


def test_tritium_serve_exits_non_zero_when_its_engine_dies():
    prelude = ("import tritium.engine.model_runner as model_runner\n"
               "from tests.test_server_faults import _die_on_the_marked\n"
               "model_runner.ModelRunner.step = _die_on_the_marked")
    with serve_process("--max-model-len", "128", prelude=prelude) as server:
        with httpx.Client(timeout=60) as client:
            innocent = client.post(server.url + "/v1/completions", json={**INNOCENTS[0], "stream": False})
            assert innocent.status_code == 200
            marked = client.post(server.url + "/v1/completions", json=MARKED)
        assert marked.status_code == 503 and "illegal memory access" in marked.json()["error"]["message"]
        start = time.monotonic()
        assert server.proc.wait(timeout=30) == 1
        assert time.monotonic() - start < 5
    assert "the engine is dead" in server.stderr and "exiting" in server.stderr
