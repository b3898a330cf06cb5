"""The engine's side of tensor parallelism: one process per rank (engine/worker.py), every plan sent to all of them,
rank 0's sampled tokens read back. The engine's process joins no collective, so it can always stop them all.

Every rank is a `python -m tritium.engine.worker --engine HOST:PORT` process that connects to the engine, which
listens there (the connection carries pickles: it takes only peers that know the key). The engine starts these
processes itself, one per GPU of this host: fresh interpreters, which run nothing of the user's script. Or, given
`ranks_address`, torchrun starts them on several hosts (docs/tensor_parallel.md). The engine sends each the model
and settings, then every plan, pickled once, through a sending thread (a rank that stops reading never blocks it).
While it waits for an answer it watches every rank's connection: a rank that raises sends its traceback and exits,
a rank that dies closes its connection. Either way, or when an answer is overdue, the engine stops every rank (kills
those it started) and raises EngineDeadError naming the rank. A clean shutdown asks each to stop and waits for it.
"""

import os
import pickle
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path

import tritium
from tritium import distributed
from tritium.engine import worker
from tritium.engine.config import EngineConfig
from tritium.engine.errors import EngineDeadError
from tritium.engine.model_runner import StepOutput
from tritium.engine.step_plan import StepPlan

# How long an answer may take: the start (loading the shard, compiling, capturing graphs), and a step (a rank that
# takes longer is hung: in a collective whose peer is gone).
START_TIMEOUT_S = 1800.0
STEP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 10.0
FAULT_GRACE_S = 1.0  # after a fault, how long the other ranks may take to say theirs


class WorkerGroup:
    """Ranks 0 .. tensor_parallel_size - 1, each in its own process, on a model folder or shape. Offers what the
    engine asks of a ModelRunner: num_pages, sizes(), step(plan), release(seq_ids); and shutdown()."""

    def __init__(self, source: worker.ModelSource, config: EngineConfig, max_model_len: int, eos_ids: set[int],
                 ) -> None:
        size = config.tensor_parallel_size
        self.procs: list[subprocess.Popen] = []  # the ranks this engine started (none when torchrun did)
        self.conns: list[Connection] = []
        self.senders: list[_Sender] = []
        self.dead: EngineDeadError | None = None
        self._dir = tempfile.mkdtemp(prefix="tritium-tp-")
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.senders, self.conns, self._dir)
        try:
            if config.ranks_address is None:
                key = secrets.token_hex(16)
                listener = Listener(("127.0.0.1", 0), authkey=key.encode())
                self._start(listener.address, key, size)
            else:
                listener = Listener(worker.host_port(config.ranks_address), authkey=worker.rank_key())
            conns = self._accept(listener, size)
            for rank in range(size):
                conns[rank].send((source, config, max_model_len, eos_ids))
                self.conns.append(conns[rank])
                self.senders.append(_Sender(conns[rank]))
            pages = self._answers("pages", list(range(size)), START_TIMEOUT_S)
            self.num_pages = config.num_kv_pages or min(pages)  # the rank with the least free memory decides
            worker.check_pages(self.num_pages, config, max_model_len)
            self._send("start", self.num_pages)
            sizes = self._answers("ready", list(range(size)), START_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        self._sizes = {key: max(s[key] for s in sizes) for key in sizes[0]}

    def _start(self, address: tuple[str, int], key: str, size: int) -> None:
        """A process per rank on this host (GPU r for rank r), their group formed through a file in a fresh folder."""
        distributed.disable_multicast()  # in this process's environment: every rank inherits it
        command = [sys.executable, "-m", "tritium.engine.worker", "--engine", f"{address[0]}:{address[1]}",
                   "--init-method", f"file://{self._dir}/rendezvous"]
        env = {**os.environ, "TRITIUM_RANK_KEY": key, "WORLD_SIZE": str(size)}
        # The ranks import the tritium this process runs, wherever it comes from (a checkout, whatever the cwd).
        package_root = str(Path(tritium.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        for rank in range(size):
            self.procs.append(subprocess.Popen(command, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))

    def _accept(self, listener: Listener, size: int) -> dict[int, Connection]:
        """Each rank's connection, once it has said its rank; a rank this engine started that ends first, or ranks
        still missing after START_TIMEOUT_S, raise EngineDeadError."""
        conns, over = {}, threading.Event()

        def accept() -> None:
            while len(conns) < size:
                try:
                    conn = listener.accept()
                    _, rank, world = conn.recv()
                except (OSError, EOFError, AuthenticationError, ValueError):
                    if over.is_set():  # the listener was closed: the wait is over
                        return
                    continue  # a stray or failed connection: wait for the next
                if world != size or not 0 <= rank < size or rank in conns:
                    conn.close()
                    continue
                conns[rank] = conn

        thread = threading.Thread(target=accept, name="tritium-accept-ranks", daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        ended = []
        while thread.is_alive() and time.monotonic() < deadline and not ended:
            thread.join(0.2)
            ended = [r for r, p in enumerate(self.procs) if p.poll() is not None]
        over.set()
        listener.close()
        if len(conns) == size:
            return conns
        for conn in conns.values():
            conn.close()
        if ended:
            self._fail(self._death(ended[0]) + " before it connected to the engine")
        self._fail(f"{len(conns)} of {size} tensor-parallel ranks connected within {START_TIMEOUT_S:.0f} s")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def sizes(self) -> dict[str, int]:
        """What a decode step reads on the rank that reads the most (ModelRunner.sizes)."""
        return self._sizes

    def step(self, plan: StepPlan) -> StepOutput:
        self._send("step", plan)
        return self._answers("done", [0], STEP_TIMEOUT_S)[0]

    def release(self, seq_ids: list[int]) -> None:
        """ModelRunner.release on every rank (before the next plan; nothing to wait for). Nothing to do once the
        ranks are gone: a dead engine still lets its requests be aborted."""
        if seq_ids and self.dead is None:
            self._send("release", seq_ids)

    def all_reduce_ms(self, batch_sizes: list[int]) -> dict[int, float]:
        """worker.all_reduce_ms on every rank at once: one all-reduce of [batch, hidden], in ms, by batch size."""
        self._send("time_all_reduce", batch_sizes)
        return self._answers("done", [0], STEP_TIMEOUT_S)[0]

    def shutdown(self) -> None:
        """Stop every rank and wait for it (killing any this engine started still there after STOP_TIMEOUT_S);
        idempotent."""
        self._finalizer()

    def _send(self, kind: str, payload: object) -> None:
        if self.dead is not None:
            raise self.dead
        message = pickle.dumps((kind, payload))  # pickled now: the plan's lists change after this call
        for sender in self.senders:
            sender.put(message)

    def _answers(self, kind: str, ranks: list[int], timeout: float) -> list:
        """The answer of kind `kind` of each of `ranks`. Any rank's error or death, or answers still missing after
        `timeout` seconds, stop every rank and raise EngineDeadError."""
        deadline = time.monotonic() + timeout
        answers = {}
        while len(answers) < len(ranks):
            ready = wait(self.conns, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = next(r for r in ranks if r not in answers)
                self._fail(f"tensor-parallel rank {late} did not answer within {timeout:.0f} s")
            for r, conn in enumerate(self.conns):
                if conn in ready:
                    try:
                        got, payload = conn.recv()
                    except (EOFError, OSError):
                        self._fault({})
                    if got == "error":
                        self._fault({r: payload})
                    if got != kind or r not in ranks:
                        self._fail(f"tensor-parallel rank {r} answered {got!r} where {kind!r} was due")
                    answers[r] = payload
        return [answers[r] for r in ranks]

    def _fault(self, errors: dict[int, str]) -> None:
        """Some rank failed: hear for up to FAULT_GRACE_S what each rank says (its traceback) or see that it is gone,
        then stop them all and raise EngineDeadError naming them. Ranks gone without a word come first: the others
        usually fail for want of them (a collective whose peer is gone)."""
        conns, gone = {conn: r for r, conn in enumerate(self.conns)}, set()
        deadline = time.monotonic() + FAULT_GRACE_S
        while conns and time.monotonic() < deadline:
            for conn in wait(list(conns), timeout=max(0.0, deadline - time.monotonic())):
                try:
                    got, payload = conn.recv()
                except (EOFError, OSError):  # gone: its connection is closed
                    gone.add(conns.pop(conn))
                    continue
                if got == "error":
                    errors.setdefault(conns[conn], payload)
        gone |= {r for r, p in enumerate(self.procs) if p.poll() is not None}
        died = [self._death(r) for r in sorted(gone - errors.keys())]
        failed = [f"tensor-parallel rank {r} failed:\n{text}" for r, text in errors.items()]
        self._fail("\n".join(died + failed) or "a tensor-parallel rank failed")

    def _death(self, rank: int) -> str:
        if not self.procs:  # started elsewhere: all the engine sees is its connection closing
            return f"tensor-parallel rank {rank} closed its connection (its process or its host is gone)"
        proc = self.procs[rank]
        try:
            code = proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return f"tensor-parallel rank {rank} (pid {proc.pid}) closed its connection"
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return f"tensor-parallel rank {rank} (pid {proc.pid}) died ({how})"

    def _fail(self, message: str) -> None:
        self.dead = EngineDeadError(message)
        for proc in self.procs:  # no stop message: a rank may be stuck in a collective with the failed one
            if proc.poll() is None:
                proc.kill()
        for conn in self.conns:  # ranks started elsewhere see their connection close, and exit
            conn.close()
        self.shutdown()
        raise self.dead


class _Sender:
    """A queue's put() over a connection to a rank: a thread sends, so a rank that stops reading never blocks the
    engine."""

    def __init__(self, conn: Connection) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._send, args=(conn,), name="tritium-send-rank", daemon=True).start()

    def put(self, message: bytes) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(None)

    def _send(self, conn: Connection) -> None:
        while (message := self._queue.get()) is not None:
            try:
                conn.send_bytes(message)
            except OSError:
                return


def _stop(procs: list, senders: list, conns: list, folder: str) -> None:
    """Ask each rank to stop and wait until it has gone (its connection closes); kill what the engine started and is
    still there after STOP_TIMEOUT_S; free the rendezvous folder."""
    stop = pickle.dumps(("stop", None))
    for sender in senders:
        sender.put(stop)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    open_conns = [c for c in conns if not c.closed]
    while open_conns and time.monotonic() < deadline:
        for conn in wait(open_conns, timeout=max(0.0, deadline - time.monotonic())):
            try:
                conn.recv_bytes()
            except (EOFError, OSError):  # the rank is gone
                open_conns.remove(conn)
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for sender in senders:
        sender.close()
    for conn in conns:
        conn.close()
    shutil.rmtree(Path(folder), ignore_errors=True)
