"""The HTTP app: OpenAI's routes (routes.py), /v1/models, /health and /metrics, behind the guard (guard.py).
Every failure is answered with OpenAI's error object and a 4xx code (5xx only for engine faults and shutdown)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tritium.engine.errors import InvalidParameter
from tritium.server.async_engine import AsyncEngine
from tritium.server.guard import Guard
from tritium.server.metrics import ServerMetrics
from tritium.server.protocol import APIError, error_body
from tritium.server.routes import Served, router

MAX_BODY_BYTES = 1 << 20


def build_app(engine: AsyncEngine, metrics: ServerMetrics, model_name: str, api_key: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES, timeout_read: float = 10.0) -> FastAPI:
    """The app over a running AsyncEngine; shutting the app down stops the engine loop. `timeout_read`: seconds a
    request's body may take to arrive."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()

    app = FastAPI(title="Tritium", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    app.state.served = Served(engine, model_name)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, timeout_read=timeout_read)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.include_router(router)
    return app


async def health(request: Request) -> JSONResponse:
    """200 while the server takes requests; 503 once its engine is dead or it is shutting down."""
    engine: AsyncEngine = request.app.state.engine
    if engine.dead is not None:
        return JSONResponse(error_body(f"the engine is dead: {engine.dead}", "server_error"), 503)
    if engine.draining:
        return JSONResponse(error_body("the server is shutting down", "server_error"), 503)
    return JSONResponse({"status": "ok"})


async def prometheus(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def models(request: Request) -> dict:
    served: Served = request.app.state.served
    return {"object": "list", "data": [{"id": served.model_name, "object": "model", "created": 0,
                                        "owned_by": "tritium", "max_model_len": served.engine.engine.max_model_len}]}


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body, exc.status)


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    """A body pydantic refused: 400 naming the field (the first error's)."""
    err = exc.errors()[0]
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, InvalidParameter):  # raised by a validator of ours: it names the field itself
        return JSONResponse(error_body(str(cause), "invalid_request_error", cause.param), 400)
    if err["type"] == "json_invalid":
        return JSONResponse(error_body(f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}",
                                       "invalid_request_error"), 400)
    param = ".".join(str(p) for p in err["loc"][1:]) or None
    return JSONResponse(jsonable_encoder(error_body(f"{param or 'body'}: {err['msg']}", "invalid_request_error",
                                                    param)), 400)


async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), exc.status_code)
