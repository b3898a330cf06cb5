"""A real `tritium serve` server on a free loopback port, run by uvicorn in a background thread, for the tests."""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tritium import default_model_path
from tritium.engine.config import EngineConfig
from tritium.server.async_engine import AsyncEngine
from tritium.server.serve import make_server

MODEL = Path(default_model_path()).name


@contextmanager
def running_server(api_key: str | None = None, model=None, name: str | None = None,
                   **engine_options) -> Iterator[tuple[str, AsyncEngine]]:
    """(base URL, the server's AsyncEngine); the server is shut down as `tritium serve` is on SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = EngineConfig.from_options(**engine_options)
    server = make_server(model or default_model_path(), "127.0.0.1", port, api_key, config, name)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server.config.app.state.engine
    finally:
        server.should_exit = True
        thread.join(timeout=40)
        assert not thread.is_alive(), "the server did not shut down"
