"""A real `tritium serve` server on a free loopback port, run by uvicorn in a background thread, for the tests; and
`serve_process`, the command itself in a child process."""

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tritium import default_model_path
from tritium.engine.config import EngineConfig
from tritium.server.async_engine import AsyncEngine
from tritium.server.config import ServerConfig
from tritium.server.serve import make_server

MODEL = Path(default_model_path()).name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(api_key: str | None = None, model=None, name: str | None = None, server: dict | None = None,
                   **engine_options) -> Iterator[tuple[str, AsyncEngine]]:
    """(base URL, the server's AsyncEngine); `server`: ServerConfig fields. The server is shut down as `tritium
    serve` is on SIGTERM."""
    port = free_port()
    config = ServerConfig(host="127.0.0.1", port=port, api_key=api_key, **(server or {}))
    uv = make_server(model or default_model_path(), config, EngineConfig.from_options(**engine_options), name)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", uv.config.app.state.engine
    finally:
        uv.should_exit = True
        thread.join(timeout=40)
        assert not thread.is_alive(), "the server did not shut down"


class ServerProcess:
    """`tritium serve` in a child process: its URL, the process, and its stderr as it comes (read by a thread, so
    that a chatty server never blocks on a full pipe)."""

    def __init__(self, options: tuple[str, ...], env: dict | None, prelude: str = "") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
               "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
        args = ["serve", "--port", str(self.port), *options]
        # `prelude`: Python run first in the child (a fault injected by a test), then the command.
        code = f"{prelude}\nfrom tritium.cli import main\nmain({args!r})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env)
        self._lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self._lines.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    @property
    def stderr(self) -> str:
        if self.proc.poll() is not None:
            self._reader.join(timeout=10)
        return "".join(self._lines)

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"the server exited: {self.stderr}"
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)


@contextmanager
def serve_process(*options: str, env: dict | None = None, prelude: str = "") -> Iterator[ServerProcess]:
    """`tritium serve OPTIONS` in a child process (one torch thread: the tests' client shares the machine) on a free
    port, once /health answers; killed on the way out if still running."""
    server = ServerProcess(options, env, prelude)
    try:
        server.wait_healthy()
        yield server
    finally:
        server.proc.kill()
        server.proc.wait()
