"""uvicorn, hardened: its HTTP/1.1 protocol with a deadline on a request's headers and a cap on open connections,
and its server with a drain on shutdown (in-flight requests get `shutdown_timeout` seconds, then end with an error)
that exits 0 after SIGTERM or SIGINT, and 1 when the engine died."""

import asyncio
import contextlib
import json
import signal
import socket
import threading
from collections.abc import Iterator

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from tritium.engine.errors import EngineDeadError
from tritium.server.async_engine import AsyncEngine
from tritium.server.config import ServerConfig
from tritium.server.protocol import error_body

# How long a connection refused by the HTTP parser keeps reading (and dropping) what its client still sends before it
# closes: closing with unread input makes the kernel answer with a reset, which can cost the client the error object.
LINGER_S = 2.0


class _Protocol(H11Protocol):
    """One connection. Set on the subclass `protocol_class` makes: `limits`."""

    limits: ServerConfig
    _header_timer: asyncio.TimerHandle | None = None
    _draining = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            body = json.dumps(error_body("the server has too many open connections", "server_error")).encode()
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            transport.close()
            return
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        if not self._draining:  # a refused request's rest is dropped (`_close_after_drain`)
            super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and self.conn.their_state is not h11.IDLE:  # the headers are in
            self._header_timer.cancel()
            self._header_timer = None

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (a bad request line, headers over its size limit ...): OpenAI's error object,
        as every other 4xx answer, where uvicorn sends plain text."""
        body = json.dumps(error_body(f"the HTTP request is malformed: {msg}", "invalid_request_error")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self._close_after_drain()

    def _close_after_drain(self) -> None:
        """Close without a reset. A client may still be sending the request the parser refused (the rest of a 100 KB
        header, say); closing at once with that input unread made the kernel reset the connection, and the client's
        next send failed before it read the answer (seen in CI). So: end our side, drop what still arrives, and close
        when the client does or after LINGER_S."""
        self._draining = True
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.limits.timeout_header, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete  # a request is being answered
        if not busy and not self.transport.is_closing():
            self.transport.close()


def protocol_class(limits: ServerConfig) -> type[H11Protocol]:
    return type("Protocol", (_Protocol,), {"limits": limits})


class Server(uvicorn.Server):
    """uvicorn's server over an AsyncEngine: a shutdown first starts the engine's drain, then uvicorn's (listeners
    closed, idle connections closed, busy ones awaited). `exit_code`: 0, or 1 once the engine has died (which also
    starts the shutdown)."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout
        self.exit_code = 0
        engine.on_dead = self._engine_died

    def _engine_died(self, exc: EngineDeadError) -> None:
        self.exit_code = 1
        self.should_exit = True  # uvicorn's main loop reads it every 0.1 s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.begin_shutdown(self.shutdown_timeout)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, less its last act: raising the signal again once shut down, which ends the process by the
        signal (exit status -15, or a KeyboardInterrupt traceback). A second SIGINT still forces the exit."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
