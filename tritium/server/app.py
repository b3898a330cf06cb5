"""The HTTP routes: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health and /metrics.
Every failure is answered with OpenAI's error object and a 4xx code (5xx only for engine faults)."""

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tritium.engine.sampling_params import SamplingParams
from tritium.server import responses as wire
from tritium.server.async_engine import AsyncEngine, EngineDead
from tritium.server.metrics import ServerMetrics
from tritium.server.protocol import ChatCompletionRequest, CompletionRequest, error_body
from tritium.server.responses import Samples, envelope, response_id

MAX_BODY_BYTES = 1 << 20


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


def build_app(engine: AsyncEngine, metrics: ServerMetrics, model_name: str, api_key: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app over a running AsyncEngine; shutting the app down stops the engine loop."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()

    app = FastAPI(title="Tritium", lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    tok = engine.engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}",
                                           "invalid_request_error"), 400)
        param = ".".join(str(p) for p in err["loc"][1:]) or None
        return JSONResponse(jsonable_encoder(error_body(f"{param or 'body'}: {err['msg']}", "invalid_request_error",
                                                        param)), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), exc.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "tritium",
                                            "max_model_len": engine.engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_request(body, model_name)
        prompts = body.prompt_ids(tok.encode)
        k = body.logprobs
        # Echo with logprobs reports the prompt's tokens too: their logprobs are the prompt logprobs.
        echo_k = k if body.echo and k is not None else None
        prompt_k = max((x for x in (body.prompt_logprobs, echo_k) if x is not None), default=None)
        params = _params(engine, prompts, lambda d: body.sampling_params(body.max_tokens, k, d,
                                                                         prompt_logprobs=prompt_k))
        rid = response_id("cmpl")
        samples = Samples(len(prompts) * body.n, params.stop)  # choice i: prompt i // n, sample i % n
        prompt_tokens = sum(map(len, prompts))
        texts = [p if isinstance(p, str) else None for p in _prompt_texts(body)]
        echoed = [False] * len(samples.text)

        def choice(i: int, text: str, new_ids: list[int], new_lps: list[dict], offset: int) -> dict:
            ids, prompt_lps = prompts[i // body.n], samples.prompt_logprobs[i]
            lps = wire.completion_logprobs(tok, new_ids, new_lps, k, offset) if k is not None else None
            out = {"index": i, "text": text, "logprobs": lps, "finish_reason": samples.finish_reason[i]}
            if body.echo and not echoed[i]:  # the prompt goes before the choice's first text
                echoed[i] = True
                prompt_text = texts[i // body.n] if texts[i // body.n] is not None else tok.decode(ids)
                out["text"] = prompt_text + text
                if lps is not None:
                    lps["text_offset"] = [o + len(prompt_text) for o in lps["text_offset"]]
                    out["logprobs"] = wire.join_logprobs(wire.echo_logprobs(tok, ids, prompt_lps, k), lps)
            if body.prompt_logprobs is not None and prompt_lps is not None:
                out["prompt_logprobs"] = wire.prompt_logprobs_body(tok, prompt_lps)
                samples.prompt_logprobs[i] = None  # sent
            return out

        updates = engine.generate(prompts, params, engine.new_request_id(rid))
        if body.stream:
            async def chunks() -> AsyncIterator[dict]:
                async for step in updates:
                    choices = []
                    for u in step:
                        offset = len(samples.text[u.index])
                        delta = samples.add(u)
                        choices.append(choice(u.index, delta, u.new_token_ids, u.new_logprobs, offset))
                    yield envelope(rid, "text_completion", model_name, choices)
                if body.include_usage:
                    yield {**envelope(rid, "text_completion", model_name, []), "usage": samples.usage(prompt_tokens)}
            return _sse(chunks())
        await _collect(request, updates, samples)
        choices = [choice(i, samples.text[i], samples.token_ids[i], samples.logprobs[i], 0)
                   for i in range(len(samples.text))]
        return {**envelope(rid, "text_completion", model_name, choices), "usage": samples.usage(prompt_tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_request(body, model_name)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        try:
            forced = body.forced_tool()
        except ValueError as exc:
            raise APIError(400, str(exc), param="tool_choice") from None
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        try:
            text = tok.apply_chat_template([m.as_template_input() for m in body.messages], body.add_generation_prompt,
                                           tools=tools)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        ids = tok.encode(text, add_special_tokens=body.add_special_tokens)
        max_tokens = body.max_completion_tokens or body.max_tokens or engine.engine.max_model_len - len(ids)
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = _params(engine, [ids], lambda d: body.sampling_params(max_tokens, k, d, forced and forced[1]))
        rid = response_id("chatcmpl")
        samples = Samples(body.n, params.stop)
        name = body.tool_choice.function.name if forced and forced[0] == "named" else None

        def lps(new_ids: list[int], new_lps: list[dict]) -> dict | None:
            return wire.chat_logprobs(tok, new_ids, new_lps, k) if k is not None else None

        def message(i: int, content: str) -> tuple[dict, str | None]:
            """The reply (text, or the forced tool calls once the sample is done) and its finish_reason."""
            reason = samples.finish_reason[i]
            if forced is None or reason is None:
                return {"content": content}, reason
            try:
                calls = wire.tool_calls(forced[0], samples.text[i], name)
            except (ValueError, TypeError, KeyError):  # cut short by max_tokens: the text as it is
                return {"content": samples.text[i]}, reason
            return {"content": None, "tool_calls": calls}, "tool_calls" if forced[0] == "required" else reason

        def extras() -> dict:
            if body.prompt_logprobs is None or samples.prompt_logprobs[0] is None:
                return {}
            return {"prompt_logprobs": wire.prompt_logprobs_body(tok, samples.prompt_logprobs[0])}

        updates = engine.generate([ids], params, engine.new_request_id(rid))
        if body.stream:
            async def chunks() -> AsyncIterator[dict]:
                roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(body.n)]
                yield envelope(rid, "chat.completion.chunk", model_name, roles)
                sent_extras = False
                async for step in updates:
                    choices = []
                    for u in step:
                        text = samples.add(u)  # a forced tool call is sent whole, once its sample is done
                        delta, reason = message(u.index, text if forced is None else "")
                        for j, call in enumerate(delta.get("tool_calls") or ()):
                            call["index"] = j
                        choices.append({"index": u.index, "delta": delta,
                                        "logprobs": lps(u.new_token_ids, u.new_logprobs), "finish_reason": reason})
                    chunk = envelope(rid, "chat.completion.chunk", model_name, choices)
                    if not sent_extras and extras():
                        chunk, sent_extras = {**chunk, **extras()}, True
                    yield chunk
                if body.include_usage:
                    yield {**envelope(rid, "chat.completion.chunk", model_name, []), "usage": samples.usage(len(ids))}
            return _sse(chunks())
        await _collect(request, updates, samples)
        choices = []
        for i in range(body.n):
            reply, reason = message(i, samples.text[i])
            choices.append({"index": i, "message": {"role": "assistant", **reply},
                            "logprobs": lps(samples.token_ids[i], samples.logprobs[i]), "finish_reason": reason})
        return {**envelope(rid, "chat.completion", model_name, choices), "usage": samples.usage(len(ids)),
                **extras()}

    return app


def _check_request(body, served: str) -> None:
    """404 for a model this server does not serve (none named: the served one); 400 naming a field that asks for
    what this server does not implement."""
    if body.model is not None and body.model != served:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {served!r}", param="model",
                       code="model_not_found")
    refused = body.refused()
    if refused is not None:
        raise APIError(400, refused[1], param=refused[0])


def _prompt_texts(body: CompletionRequest) -> list:
    """Each prompt as given: its text, or its token ids."""
    one = isinstance(body.prompt, str) or isinstance(body.prompt[0], int)
    return [body.prompt] if one else list(body.prompt)


def _params(engine: AsyncEngine, prompts: list[list[int]], make) -> SamplingParams:
    """The request's SamplingParams (`make(model defaults)`), checked with each prompt against the engine (lengths,
    vocabulary) before anything is queued; in a batch, the error names the prompt."""
    defaults = {k: v for k, v in engine.engine.sampling_defaults.items() if k != "max_tokens"}  # the request's rule
    where = ""
    try:
        params = make(defaults)
        for i, ids in enumerate(prompts):
            where = f"prompt {i}: " if len(prompts) > 1 else ""
            engine.engine.check_request(ids, params)
    except ValueError as exc:
        raise APIError(400, where + str(exc)) from None
    return params


async def _collect(request: Request, updates: AsyncIterator, samples: Samples) -> None:
    """Record a whole response's updates. A client that disconnects first cancels the collection, which ends
    `updates` early and so aborts the request, as a stream's end does."""
    async def collect() -> None:
        async for step in updates:
            for u in step:
                samples.add(u)

    work, gone = asyncio.create_task(collect()), asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        work.cancel()
        gone.cancel()
    if work not in done:
        raise APIError(499, "the client closed the request")  # nginx's code; nobody is left to read it
    try:
        work.result()
    except EngineDead as exc:
        raise APIError(503, str(exc), "server_error") from None
    except ValueError as exc:  # the engine refused a prompt
        raise APIError(400, str(exc)) from None


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (as Starlette's StreamingResponse listens for it)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events, `data: [DONE]` last; an engine that stops mid-stream is reported in an error event."""
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except EngineDead as exc:
            yield f"data: {json.dumps(error_body(str(exc), 'server_error'))}\n\n"
        except ValueError as exc:  # the engine refused a prompt
            yield f"data: {json.dumps(error_body(str(exc), 'invalid_request_error'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


class _Guard:
    """ASGI middleware in front of the routes: the API key on /v1 (constant-time compare), then the body size
    limit (413), checked on the declared length and on the bytes as they arrive."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
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
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await _reply(send, 413, _too_large(self.max_body_bytes))
            if not message.get("more_body") or message["type"] != "http.request":
                break

        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _too_large(limit: int) -> dict:
    return error_body(f"the request body is over {limit} bytes", "invalid_request_error", code="request_too_large")


async def _reply(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
