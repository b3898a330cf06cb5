"""The OpenAI routes, /v1/completions and /v1/chat/completions: a request's fields checked and turned into
SamplingParams and prompts, queued in the engine, answered whole or streamed as server-sent events. Every way a
request can end is an answer: its result, or an error object (a streamed one in an event before `data: [DONE]`)."""

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tritium.engine.errors import EngineDeadError, InvalidParameter, RequestFailed
from tritium.engine.sampling_params import SamplingParams
from tritium.server.answers import ChatAnswer, CompletionAnswer
from tritium.server.async_engine import AsyncEngine, ServerShuttingDown
from tritium.server.protocol import APIError, ChatCompletionRequest, CompletionRequest

router = APIRouter()


@dataclass(frozen=True)
class Served:
    """What the routes serve: the engine loop, under a model name (in app.state.served)."""

    engine: AsyncEngine
    model_name: str


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    served = _served(request, body)
    tok = served.engine.engine.tokenizer
    prompts = body.prompt_ids(tok.encode)
    k = body.logprobs
    # Echo with logprobs reports the prompt's tokens too: their logprobs are the prompt logprobs.
    echo_k = k if body.echo and k is not None else None
    prompt_k = max((x for x in (body.prompt_logprobs, echo_k) if x is not None), default=None)
    params = _params(served, prompts, lambda d: body.sampling_params(body.max_tokens, k, d, prompt_logprobs=prompt_k))
    answer = CompletionAnswer(tok, served.model_name, body, prompts, params.stop)
    return await _respond(request, served, prompts, params, answer, body.stream)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    served = _served(request, body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    try:
        forced = body.forced_tool()
    except ValueError as exc:
        raise APIError(400, str(exc), param="tool_choice") from None
    tok = served.engine.engine.tokenizer
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    try:
        text = tok.apply_chat_template([m.as_template_input() for m in body.messages], body.add_generation_prompt,
                                       tools=tools)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    ids = tok.encode(text, add_special_tokens=body.add_special_tokens)
    room = served.engine.engine.max_model_len - len(ids)
    if room < 1:
        raise APIError(400, f"the conversation ({len(ids)} tokens) leaves no room for output within max_model_len "
                       f"({served.engine.engine.max_model_len})", param="messages")
    max_tokens = body.max_completion_tokens or body.max_tokens or room  # unset: what the context leaves
    k = (body.top_logprobs or 0) if body.logprobs else None
    params = _params(served, [ids], lambda d: body.sampling_params(max_tokens, k, d, forced and forced[1]))
    answer = ChatAnswer(tok, served.model_name, body, ids, params.stop, forced)
    return await _respond(request, served, [ids], params, answer, body.stream)


def _served(request: Request, body: CompletionRequest | ChatCompletionRequest) -> Served:
    """What the app serves; 404 for a model it does not serve (none named: the served one), 400 naming a field that
    asks for what this server does not implement."""
    served = request.app.state.served
    if body.model is not None and body.model != served.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {served.model_name!r}",
                       param="model", code="model_not_found")
    refused = body.refused()
    if refused is not None:
        raise APIError(400, refused[1], param=refused[0])
    return served


def _params(served: Served, prompts: list[list[int]], make: Callable[[dict], SamplingParams]) -> SamplingParams:
    """The request's SamplingParams (`make(model defaults)`), checked with each prompt against the engine (lengths,
    vocabulary) before anything is queued; in a batch, the error names the prompt."""
    engine = served.engine.engine
    defaults = {k: v for k, v in engine.sampling_defaults.items() if k != "max_tokens"}  # the request's rule
    where = ""
    try:
        params = make(defaults)
        for i, ids in enumerate(prompts):
            where = f"prompt {i}: " if len(prompts) > 1 else ""
            engine.check_request(ids, params)
    except ValueError as exc:
        raise APIError(400, where + str(exc), param=getattr(exc, "param", None)) from None
    return params


async def _respond(request: Request, served: Served, prompts: list[list[int]], params: SamplingParams,
                   answer: CompletionAnswer | ChatAnswer, stream: bool):
    """Queue the request and answer it: streamed, or whole once it is done. A dead engine or a server shutting
    down refuses it at once (503, before a stream begins)."""
    try:
        updates = served.engine.generate(prompts, params, served.engine.new_request_id(answer.id))
    except (EngineDeadError, ServerShuttingDown) as exc:
        raise _api_error(exc) from None
    if stream:
        return _sse(answer.chunks(updates))
    await _collect(request, updates, answer)
    return answer.whole()


async def _collect(request: Request, updates: AsyncIterator, answer: CompletionAnswer | ChatAnswer) -> None:
    """Record a whole response's updates. A client that disconnects first cancels the collection, which ends
    `updates` early and so aborts the request, as a stream's end does."""
    async def collect() -> None:
        async for step in updates:
            for u in step:
                answer.samples.add(u)

    work, gone = asyncio.create_task(collect()), asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        work.cancel()
        gone.cancel()
    if work not in done:
        raise APIError(499, "the client closed the request")  # nginx's code; nobody is left to read it
    if work.exception() is not None:
        raise _api_error(work.exception())


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (as Starlette's StreamingResponse listens for it)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events, `data: [DONE]` last; a request that ends in an error mid-stream gets an error event."""
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except Exception as exc:  # noqa: BLE001  every way a request ends is an answer
            yield f"data: {json.dumps(_api_error(exc).body)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _api_error(exc: BaseException) -> APIError:
    """The answer to a request that ended with `exc` in the engine: 503 when the engine is dead or the server is
    shutting down, 400 when the engine refused it, 500 when it failed inside the engine."""
    if isinstance(exc, (EngineDeadError, ServerShuttingDown)):
        return APIError(503, str(exc), "server_error")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), param=exc.param if isinstance(exc, InvalidParameter) else None)
    message = str(exc) if isinstance(exc, RequestFailed) else f"internal error: {type(exc).__name__}: {exc}"
    return APIError(500, message, "server_error")
