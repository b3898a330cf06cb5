"""ASGI middleware in front of the routes: the API key on /v1 (401 before the body is read), then the body, read
whole before any route sees it: over the size limit it is a 413 (on the declared length, before reading, and on the
bytes as they arrive), and one that does not arrive within the read timeout is a 408."""

import asyncio
import hmac
import json

from tritium.server.protocol import error_body


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, timeout_read: float) -> None:
        self.app, self.max_body_bytes, self.timeout_read = app, max_body_bytes, timeout_read
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected and scope["path"].startswith("/v1"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await _reply(send, 401, error_body("a valid API key is needed: Authorization: Bearer KEY",
                                                          "authentication_error", code="invalid_api_key"))
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return await _reply(send, 413, _too_large(self.max_body_bytes))
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_read)
        except asyncio.TimeoutError:
            return await _reply(send, 408, error_body(f"the request body did not arrive within {self.timeout_read} s",
                                                      "invalid_request_error", code="request_timeout"))
        if body is None:
            return await _reply(send, 413, _too_large(self.max_body_bytes))
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        """The whole body; None once it passes the size limit."""
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return None
            if not message.get("more_body") or message["type"] != "http.request":
                return body


def _too_large(limit: int) -> dict:
    return error_body(f"the request body is over {limit} bytes", "invalid_request_error", code="request_too_large")


async def _reply(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
