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
    """A sequence's progress since its last update: its whole text so far, its new tokens and their logprobs."""

    index: int
    text: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]]
    finish_reason: str | None


class EngineDead(RuntimeError):
    """The engine loop stopped (shutdown or a failed step) before the request finished."""


@dataclass
class _Request:
    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue
    arrival: float
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

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[list[SeqUpdate]]:
        """Queue a request (already checked with engine.check_request) and yield its sequences' updates, one list
        per engine step, until all n have finished. Leaving early (a client gone) aborts the request."""
        if self._stopping:
            raise EngineDead("the server is shutting down")
        req = _Request(asyncio.get_running_loop(), asyncio.Queue(), time.perf_counter())
        self._send(("add", request_id, prompt_ids, params, req))
        unfinished = params.n
        try:
            while unfinished:
                updates = await req.updates.get()
                if isinstance(updates, Exception):
                    raise updates
                unfinished -= sum(u.finish_reason is not None for u in updates)
                yield updates
        finally:
            if unfinished:
                self._send(("abort", request_id))

    def shutdown(self) -> None:
        """Stop the loop; requests still queued or running are told with EngineDead."""
        self._stopping = True
        self._send(("stop",))
        self._thread.join()

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
                _, request_id, prompt_ids, params, req = command
                try:
                    req.seqs = self.engine.add_request(prompt_ids, params, request_id)
                except ValueError as exc:
                    req.loop.call_soon_threadsafe(req.updates.put_nowait, exc)
                    continue
                self._requests[request_id] = req
                self.metrics.prompt_tokens.inc(len(prompt_ids))
            else:
                self.engine.abort(command[1])
                if self._requests.pop(command[1], None) is not None:
                    self.metrics.requests.labels("abort").inc()
            self._gauges()

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
                updates.append(SeqUpdate(seq.index, seq.text, seq.output_ids[sent:], seq.logprobs[sent:],
                                         seq.finish_reason))
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
        blocks = self.engine.blocks
        self.metrics.kv_usage.set(1 - blocks.num_free / blocks.num_blocks)

    def _fail_all(self, exc: Exception) -> None:
        for request_id, req in self._requests.items():
            self.engine.abort(request_id)
            req.loop.call_soon_threadsafe(req.updates.put_nowait, exc)
        self._requests.clear()
        self._gauges()
