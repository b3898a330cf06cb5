"""The engine loop behind the server: one thread owns the LLMEngine and steps it while there is work; requests
from the event loop arrive through a command queue, and each sequence's progress goes back to its request's
asyncio queue. So many concurrent requests share one batch and the engine is touched from one thread only.

A request that fails inside the engine ends alone (RequestFailed). An engine fault marks the loop dead: every
request fails with EngineDeadError, new ones are refused, and `on_dead` tells the server. A shutdown drains: new
requests are refused (ServerShuttingDown), those in flight run until the deadline, then fail with it."""

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from tritium.engine.errors import EngineDeadError, InvalidParameter, RequestFailed
from tritium.engine.llm_engine import LLMEngine
from tritium.engine.sampling_params import SamplingParams
from tritium.engine.sequence import Sequence, Status
from tritium.server.metrics import SeqTimes, ServerMetrics
from tritium.server.stats import StatsLog, log_request

logger = logging.getLogger("tritium.server")


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
    error: str | None = None  # finish_reason "error": what failed


class ServerShuttingDown(RuntimeError):
    """The server is shutting down: a new request is refused, and one still running at the deadline ends."""


@dataclass
class _Request:
    """One prompt's engine request; the prompts of a batch share the loop and the updates queue."""

    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue
    arrival: float
    first_index: int  # prompt index * n
    seqs: list[Sequence] = field(default_factory=list)
    sent: dict[int, int] = field(default_factory=dict)  # seq_id -> tokens already reported
    times: dict[int, SeqTimes] = field(default_factory=dict)  # seq_id -> its timestamps, for the metrics
    done: set[int] = field(default_factory=set)  # seq_ids whose end was reported


class AsyncEngine:
    """`log_requests`: a log line per finished request; `stats_interval`: seconds between the stats lines."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, log_requests: bool = True,
                 stats_interval: float = 10.0) -> None:
        self.engine, self.metrics, self.log_requests = engine, metrics, log_requests
        self.stats = StatsLog(engine, stats_interval)
        self.dead: EngineDeadError | None = None
        self.on_dead: Callable[[EngineDeadError], None] = lambda exc: None  # called from the engine thread
        self.draining = False
        self._deadline: float | None = None  # when draining: the end of the grace period (engine thread's copy)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._requests: dict[str, _Request] = {}  # touched by the engine thread only
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="tritium-engine", daemon=True)
        self._thread.start()

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 request_id: str) -> AsyncIterator[list[SeqUpdate]]:
        """Queue each prompt (already checked with engine.check_request) as an engine request, all or none (a
        ValueError), and yield their sequences' updates, a list per engine step and prompt, until all have
        finished. Leaving early (a client gone) aborts them. A request that fails in the engine raises
        RequestFailed; a dead engine, EngineDeadError; a shutdown, ServerShuttingDown (at once, before anything is
        queued, when the engine is dead or shutting down already)."""
        if self.dead is not None:
            raise self.dead
        if self.draining or self._stopped:
            raise ServerShuttingDown("the server is shutting down")
        return self._updates(prompts, params, request_id)

    async def _updates(self, prompts: list[list[int]], params: SamplingParams,
                       request_id: str) -> AsyncIterator[list[SeqUpdate]]:
        loop, updates, now = asyncio.get_running_loop(), asyncio.Queue(), time.perf_counter()
        request_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        reqs = [_Request(loop, updates, now, i * params.n) for i in range(len(prompts))]
        self._send(("add", request_ids, prompts, params, reqs))
        unfinished, output_tokens, status = params.n * len(prompts), 0, 499  # 499: the client left first
        try:
            while unfinished:
                step = await updates.get()
                if isinstance(step, Exception):
                    raise step
                if failed := next((u.error for u in step if u.finish_reason == "error"), None):
                    raise RequestFailed(f"the request failed in the engine: {failed}")
                unfinished -= sum(u.finish_reason is not None for u in step)
                output_tokens += sum(len(u.new_token_ids) for u in step)
                yield step
            status = 200
        except Exception as exc:
            status = _status(exc)
            raise
        finally:
            if unfinished:
                self._send(("abort", request_ids))
            if self.log_requests:
                log_request(request_id, status, sum(map(len, prompts)), output_tokens, time.perf_counter() - now)

    def begin_shutdown(self, timeout: float) -> None:
        """Refuse new requests; those in flight may run for `timeout` seconds more, then fail with
        ServerShuttingDown."""
        self.draining = True
        self._send(("drain", time.monotonic() + timeout))

    def shutdown(self) -> None:
        """Stop the loop (and the engine's tensor-parallel ranks); requests still queued or running fail with
        ServerShuttingDown."""
        self._stopped = True
        self._send(("stop",))
        self._thread.join()
        self.engine.shutdown()

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _loop(self) -> None:
        while self._drain():
            if self._deadline is not None and time.monotonic() >= self._deadline and self._requests:
                self._fail_all(ServerShuttingDown("the server shut down before the request finished"))
            if self.dead is not None or not self.engine.has_unfinished():
                self._wake.wait(None if self._deadline is None else max(0.0, self._deadline - time.monotonic()))
                self._wake.clear()
                continue
            started = time.perf_counter()
            try:
                self.engine.step()
            except Exception as exc:  # noqa: BLE001  the engine's own fault, or one it could not place: it is dead
                self._die(exc)
                continue
            self._publish(started)
            self.stats.maybe_log()
        self._fail_all(ServerShuttingDown("the server shut down before the request finished"))

    def _die(self, exc: Exception) -> None:
        if not isinstance(exc, EngineDeadError):
            logger.critical("the engine loop failed", exc_info=exc)
            exc = EngineDeadError(f"the engine failed: {type(exc).__name__}: {exc}")
        self.dead = exc
        self._fail_all(exc)
        self.on_dead(exc)

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
            elif command[0] == "drain":
                self._deadline = command[1]
            else:
                for request_id in command[1]:
                    self.engine.abort(request_id)
                    if (req := self._requests.pop(request_id, None)) is not None:
                        self._finish_unreported(req, "abort")
            self.metrics.engine_state(self.engine, stepped=False)

    def _add(self, request_ids: list[str], prompts: list[list[int]], params: SamplingParams,
             reqs: list[_Request]) -> None:
        """Add a batch's prompts to the engine; one it rejects (or a dead engine) takes the others back out, and the
        error (naming the prompt in a batch) goes to the batch's queue."""
        added = []
        try:
            if self.dead is not None:
                raise self.dead
            for request_id, prompt_ids, req in zip(request_ids, prompts, reqs):
                req.seqs = self.engine.add_request(prompt_ids, params, request_id)
                added.append(request_id)
        except Exception as exc:  # noqa: BLE001  refused, or its set-up failed: the request's error alone
            for request_id in added:
                self.engine.abort(request_id)
            error = _in_prompt(exc, len(added)) if len(prompts) > 1 else exc
            reqs[0].loop.call_soon_threadsafe(reqs[0].updates.put_nowait, error)
            return
        for req, prompt_ids in zip(reqs, prompts):
            req.times = {seq.seq_id: SeqTimes(req.arrival, len(prompt_ids)) for seq in req.seqs}
        self._requests.update(zip(request_ids, reqs))
        self.stats.prompt_tokens += sum(map(len, prompts))

    def _publish(self, started: float) -> None:
        """Send each request the progress of the step that began at `started`, and record it in the metrics."""
        now = time.perf_counter()
        for request_id, req in list(self._requests.items()):
            updates = []
            for seq in req.seqs:
                times = req.times[seq.seq_id]
                if times.scheduled is None and (seq.status is not Status.WAITING or seq.output_ids):
                    times.scheduled = started
                sent = req.sent.get(seq.seq_id, 0)
                new = len(seq.output_ids) - sent
                if seq.seq_id in req.done or (not new and seq.finish_reason is None):
                    continue
                if new:
                    self.metrics.tokens(times, now, new)
                    self.stats.generation_tokens += new
                req.sent[seq.seq_id] = len(seq.output_ids)
                if seq.finish_reason is not None:
                    req.done.add(seq.seq_id)
                    self.metrics.finish(times, seq.finish_reason, now, len(seq.output_ids), seq.params)
                first = sent == 0 and seq.params.prompt_logprobs is not None
                updates.append(SeqUpdate(req.first_index + seq.index, seq.text, seq.output_ids[sent:],
                                         seq.logprobs[sent:], seq.finish_reason,
                                         seq.prompt_logprobs if first else None, seq.error))
            if updates:
                req.loop.call_soon_threadsafe(req.updates.put_nowait, updates)
            if all(s.finish_reason is not None for s in req.seqs):
                del self._requests[request_id]
        self.metrics.engine_state(self.engine, stepped=True)

    def _finish_unreported(self, req: _Request, reason: str) -> None:
        """Count the request's sequences whose end was not reported as ended for `reason` (abort, error)."""
        now = time.perf_counter()
        for seq in req.seqs:
            if seq.seq_id not in req.done:
                self.metrics.finish(req.times[seq.seq_id], reason, now, len(seq.output_ids), seq.params)

    def _fail_all(self, exc: Exception) -> None:
        for request_id, req in self._requests.items():
            self.engine.abort(request_id)
            self._finish_unreported(req, "error")
            req.loop.call_soon_threadsafe(req.updates.put_nowait, exc)
        self._requests.clear()
        self.metrics.engine_state(self.engine, stepped=False)


def _in_prompt(exc: Exception, i: int) -> Exception:
    """The same error, its message naming prompt i of a batch."""
    if isinstance(exc, InvalidParameter):
        return InvalidParameter(exc.param, f"prompt {i}: {exc}")
    if isinstance(exc, (ValueError, RequestFailed)):
        return (ValueError if isinstance(exc, ValueError) else RequestFailed)(f"prompt {i}: {exc}")
    return exc


def _status(exc: Exception) -> int:
    """The HTTP status a request that ended with `exc` gets (for its log line)."""
    if isinstance(exc, (EngineDeadError, ServerShuttingDown)):
        return 503
    return 500 if isinstance(exc, RequestFailed) else 400 if isinstance(exc, ValueError) else 500
