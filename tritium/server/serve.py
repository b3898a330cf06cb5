"""`tritium serve`: load the engine, start its loop and the app under the hardened uvicorn server (http.py); logs go
through `logging` (the command line sends them to stderr). SIGTERM or SIGINT drains and exits 0; an engine that dies
exits 1."""

import logging
import resource
from pathlib import Path

import uvicorn

from tritium.engine.config import EngineConfig
from tritium.engine.llm_engine import LLMEngine
from tritium.models.config import ModelConfig
from tritium.server.app import build_app
from tritium.server.async_engine import AsyncEngine
from tritium.server.config import ServerConfig
from tritium.server.http import Server, protocol_class
from tritium.server.metrics import ServerMetrics

# uvicorn's own limit on the shutdown, a backstop past ours: by then every request has been answered.
SHUTDOWN_MARGIN_SECONDS = 5
FILES_BESIDES_CONNECTIONS = 256  # model files, the listener, pipes ...

logger = logging.getLogger("tritium.server")


def make_server(model: str | ModelConfig, config: ServerConfig, engine_config: EngineConfig,
                name: str | None = None) -> Server:
    """A ready server (not yet running) for a model folder or Hub id, served under `name` (default: the Hub id as
    given, or the folder's name), or for random weights in a ModelConfig's shape, served under `name`."""
    name = name or served_name(model)
    metrics = ServerMetrics(name)
    engine = AsyncEngine(LLMEngine(model, engine_config), metrics, config.log_requests)
    app = build_app(engine, metrics, name, config.api_key, timeout_read=config.timeout_header)
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", http=protocol_class(config),
                        timeout_keep_alive=config.timeout_keep_alive,
                        timeout_graceful_shutdown=config.shutdown_timeout + SHUTDOWN_MARGIN_SECONDS)
    return Server(uv, engine, config.shutdown_timeout)


def run_server(model: str | ModelConfig, config: ServerConfig, engine_config: EngineConfig,
               name: str | None = None) -> int:
    """Serve until SIGTERM or SIGINT (returns 0) or the engine's death (returns 1)."""
    _allow_open_files(config.max_connections + FILES_BESIDES_CONNECTIONS)
    name = name or served_name(model)
    server = make_server(model, config, engine_config, name)
    if config.api_key is None:
        logger.warning("No --api-key: anyone who can reach %s:%d can use this server%s", config.host, config.port,
                       " (loopback only)." if config.host in ("127.0.0.1", "localhost", "::1") else ".")
    logger.info("Serving %s at http://%s:%d/v1", name, config.host, config.port)
    server.run()
    if server.exit_code:
        logger.critical("exiting: %s", server.engine.dead)
    return server.exit_code


def _allow_open_files(wanted: int) -> None:
    """Raise this process's soft limit on open files toward `wanted` (each connection holds one), up to the hard
    limit; say so when the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        logger.warning("the open-file limit (%d) is below --max-connections + %d: connections past it are refused "
                       "by the system", hard, FILES_BESIDES_CONNECTIONS)


def served_name(model: str | Path) -> str:
    """The name a model is served under when none is given: a folder's name, or a Hub id as given (vLLM's)."""
    path = Path(model).expanduser()
    return path.name if path.exists() else str(model)
