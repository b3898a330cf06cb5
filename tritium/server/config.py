"""How `tritium serve` faces its clients, in one typed object: address, API key, and the limits that keep a slow
or idle client from holding the server (timeouts, a cap on open connections), and the shutdown's grace period."""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """host, port: where to listen. api_key: required on every /v1 request when set.
    timeout_keep_alive: seconds an idle keep-alive connection stays open between requests.
    timeout_header: seconds a client has to send a request's headers, from its connection or its previous answer
        (and then again to send the body): a client that sends nothing, or half a header, is closed.
    max_connections: open connections at most; one more is answered 503 and closed at once.
    shutdown_timeout: seconds requests in flight may run on after SIGTERM or SIGINT; then they end with an error.
    log_requests: a log line per finished request."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    timeout_keep_alive: float = 5.0
    timeout_header: float = 10.0
    max_connections: int = 2048
    shutdown_timeout: float = 30.0
    log_requests: bool = True

    def __post_init__(self) -> None:
        for name in ("timeout_keep_alive", "timeout_header", "shutdown_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if isinstance(self.max_connections, bool) or not isinstance(self.max_connections, int) or (
                self.max_connections < 1):
            raise ValueError(f"max_connections must be an integer >= 1, got {self.max_connections!r}")
