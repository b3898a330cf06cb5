"""The engine loop behind the server: one thread owns the LLMEngine and steps it while there is work; requests
from the event loop arrive through a command queue, and each sequence's progress goes back to its request's
asyncio queue. So many concurrent requests share one batch and the engine is touched from one thread only."""

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tritium.engine.llm_engine import LLMEngine
from tritium.engine.sampling_params import SamplingParams
from tritium.engine.sequence import Sequence
from tritium.server.metrics import ServerMetrics


@dataclass(frozen=True)
class SeqUpdate:
    """A sequence's progress since its last update: its whole text so far, its new tokens and their logprobs.
    `index` is prompt index * n + sample index (OpenAI's choice index)."""

    index: int
    text: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]]
    finish_reason: str | None
    prompt_logprobs: list | None = None  # in a sequence's first update, when the request asked for them


class EngineDead(RuntimeError):
    """The engine loop stopped (shutdown or a failed step) before the request finished."""


@dataclass
class _Request:
    """One prompt's engine request; the prompts of a batch share the loop and the updates queue."""

    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue
    arrival: float
    first_index: int  # prompt index * n
    seqs: list[Sequence] = field(default_factory=list)
    sent: dict[int, int] = field(default_factory=dict)  # seq_id -> tokens already reported
    last_token_at: dict[int, float] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)  # seq_ids whose end was reported


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics) -> None:
        self.engine, self.metrics = engine, metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._requests: dict[str, _Request] = {}  # touched by the engine thread only
        self._ids = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tritium-engine", daemon=True)
        self._thread.start()

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(self, prompts: list[list[int]], params: SamplingParams,
                       request_id: str) -> AsyncIterator[list[SeqUpdate]]:
        """Queue each prompt (already checked with engine.check_request) as an engine request, all or none (a
        ValueError), and yield their sequences' updates, a list per engine step and prompt, until all have
        finished. Leaving early (a client gone) aborts them."""
        if self._stopping:
            raise EngineDead("the server is shutting down")
        loop, updates, now = asyncio.get_running_loop(), asyncio.Queue(), time.perf_counter()
        request_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        reqs = [_Request(loop, updates, now, i * params.n) for i in range(len(prompts))]
        self._send(("add", request_ids, prompts, params, reqs))
        unfinished = params.n * len(prompts)
        try:
            while unfinished:
                step = await updates.get()
                if isinstance(step, Exception):
                    raise step
                unfinished -= sum(u.finish_reason is not None for u in step)
                yield step
        finally:
            if unfinished:
                self._send(("abort", request_ids))

    def shutdown(self) -> None:
        """Stop the loop (and the engine's tensor-parallel ranks); requests still queued or running are told with
        EngineDead."""
        self._stopping = True
        self._send(("stop",))
        self._thread.join()
        self.engine.shutdown()

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _loop(self) -> None:
        while True:
            if not self._drain():
                self._fail_all(EngineDead("the server shut down before the request finished"))
                return
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as exc:  # noqa: BLE001  a failed step ends its requests, not the server
                self._fail_all(EngineDead(f"the engine failed: {exc}"))
                continue
            self._publish()

    def _drain(self) -> bool:
        """Apply queued commands; False once asked to stop."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            if command[0] == "stop":
                return False
            if command[0] == "add":
                self._add(*command[1:])
            else:
                for request_id in command[1]:
                    self.engine.abort(request_id)
                    if self._requests.pop(request_id, None) is not None:
                        self.metrics.requests.labels("abort").inc()
            self._gauges()

    def _add(self, request_ids: list[str], prompts: list[list[int]], params: SamplingParams,
             reqs: list[_Request]) -> None:
        """Add a batch's prompts to the engine; one it rejects takes the others back out, and the error (naming
        the prompt in a batch) goes to the batch's queue."""
        added = []
        try:
            for request_id, prompt_ids, req in zip(request_ids, prompts, reqs):
                req.seqs = self.engine.add_request(prompt_ids, params, request_id)
                added.append(request_id)
        except ValueError as exc:
            for request_id in added:
                self.engine.abort(request_id)
            error = ValueError(f"prompt {len(added)}: {exc}") if len(prompts) > 1 else exc
            reqs[0].loop.call_soon_threadsafe(reqs[0].updates.put_nowait, error)
            return
        self._requests.update(zip(request_ids, reqs))
        self.metrics.prompt_tokens.inc(sum(map(len, prompts)))

    def _publish(self) -> None:
        now = time.perf_counter()
        for request_id, req in list(self._requests.items()):
            updates = []
            for seq in req.seqs:
                sent = req.sent.get(seq.seq_id, 0)
                new = len(seq.output_ids) - sent
                if seq.seq_id in req.done or (not new and seq.finish_reason is None):
                    continue
                if new:
                    self._time_tokens(req, seq.seq_id, now, new)
                req.sent[seq.seq_id] = len(seq.output_ids)
                if seq.finish_reason is not None:
                    req.done.add(seq.seq_id)
                first = sent == 0 and seq.params.prompt_logprobs is not None
                updates.append(SeqUpdate(req.first_index + seq.index, seq.text, seq.output_ids[sent:],
                                         seq.logprobs[sent:], seq.finish_reason,
                                         seq.prompt_logprobs if first else None))
            if updates:
                req.loop.call_soon_threadsafe(req.updates.put_nowait, updates)
            if all(s.finish_reason is not None for s in req.seqs):
                del self._requests[request_id]
                self.metrics.requests.labels(req.seqs[0].finish_reason).inc()
        self._gauges()

    def _time_tokens(self, req: _Request, seq_id: int, now: float, new: int) -> None:
        self.metrics.generation_tokens.inc(new)
        last = req.last_token_at.get(seq_id)
        if last is None:
            self.metrics.ttft.observe(now - req.arrival)
        else:
            self.metrics.tpot.observe((now - last) / new)
        req.last_token_at[seq_id] = now

    def _gauges(self) -> None:
        sched = self.engine.scheduler
        self.metrics.running.set(len({s.request_id for s in sched.running}))
        self.metrics.waiting.set(len({s.request_id for s in sched.waiting} - {s.request_id for s in sched.running}))
        pages = self.engine.pages
        self.metrics.kv_usage.set(1 - pages.num_free / pages.num_pages)

    def _fail_all(self, exc: Exception) -> None:
        for request_id, req in self._requests.items():
            self.engine.abort(request_id)
            req.loop.call_soon_threadsafe(req.updates.put_nowait, exc)
        self._requests.clear()
        self._gauges()
