"""`tritium serve`: load the engine, start its loop and the app under uvicorn; SIGTERM lets in-flight requests
finish (for up to a grace period) before the engine loop stops."""

import sys
from pathlib import Path

import uvicorn

from tritium.engine.config import EngineConfig
from tritium.engine.llm_engine import LLMEngine
from tritium.models.config import ModelConfig
from tritium.server.app import build_app
from tritium.server.async_engine import AsyncEngine
from tritium.server.metrics import ServerMetrics

GRACE_SECONDS = 30


def make_server(model: str | ModelConfig, host: str, port: int, api_key: str | None, config: EngineConfig,
                name: str | None = None) -> uvicorn.Server:
    """A ready uvicorn server (not yet running) for a model folder or Hub id, served under `name` (default: the
    Hub id as given, or the folder's name), or for random weights in a ModelConfig's shape, served under `name`."""
    name = name or served_name(model)
    metrics = ServerMetrics(name)
    engine = AsyncEngine(LLMEngine(model, config), metrics)
    app = build_app(engine, metrics, name, api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACE_SECONDS)
    return uvicorn.Server(config)


def run_server(model: str | ModelConfig, host: str, port: int, api_key: str | None, config: EngineConfig,
               name: str | None = None) -> None:
    name = name or served_name(model)
    server = make_server(model, host, port, api_key, config, name)
    if api_key is None:
        print(f"No --api-key: anyone who can reach {host}:{port} can use this server"
              + (" (loopback only)." if host in ("127.0.0.1", "localhost", "::1") else "."), file=sys.stderr)
    print(f"Serving {name} at http://{host}:{port}/v1", file=sys.stderr)
    server.run()


def served_name(model: str | Path) -> str:
    """The name a model is served under when none is given: a folder's name, or a Hub id as given (vLLM's)."""
    path = Path(model).expanduser()
    return path.name if path.exists() else str(model)
