"""``create_app(llm)``: the FastAPI application (routes, errors, lifespan).

    routes (this file) -> OpenAIServing / SegmentService -> EngineLoop (one thread) -> LLM
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparsex.server.engine_api import context_limit
from sparsex.server.engine_loop import EngineLoop
from sparsex.server.metrics import ServerMetrics
from sparsex.server.protocol import APIError, validation_error
from sparsex.server.segments import SegmentService
from sparsex.server.serving import OpenAIServing

if TYPE_CHECKING:
    from sparsex.server.engine_api import ServedLLM

log = logging.getLogger("sparsex.server")


def create_app(
    llm: ServedLLM,
    *,
    max_queue: int = 256,
    served_model_name: str | None = None,
    default_max_tokens: int = 256,
    default_reuse: str | None = None,
) -> FastAPI:
    """An OpenAI-compatible server over ``llm``; the engine thread lives as long as the app's lifespan.

    max_queue: most engine requests in flight (waiting + running); past it requests get 429.
    served_model_name: the model id clients must send (default: ``llm.model_name``).
    default_max_tokens: ``max_tokens`` for requests that give none.
    default_reuse: reuse method for requests whose ``sparsex.reuse`` is absent.
    """
    engine = EngineLoop(llm, max_queue=max_queue)
    metrics = ServerMetrics()
    model_name = served_model_name or llm.model_name
    serving = OpenAIServing(llm, engine, metrics, model_name, default_max_tokens, default_reuse)
    segments = SegmentService(llm, engine)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="SparseX", version="0.1.0", lifespan=lifespan)
    app.state.llm = llm
    app.state.engine = engine
    app.state.metrics = metrics
    _install_error_handlers(app, metrics)

    def ok(request: Request, body: dict[str, Any]) -> JSONResponse:
        metrics.count_http(request.url.path, 200)
        return JSONResponse(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        response = await serving.chat(request)
        metrics.count_http(request.url.path, response.status_code)
        return response

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        response = await serving.completions(request)
        metrics.count_http(request.url.path, response.status_code)
        return response

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "sparsex",
                "max_model_len": context_limit(llm)}

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        return ok(request, {"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> JSONResponse:
        serving.check_model(model)
        return ok(request, model_card())

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.is_alive:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        return JSONResponse({"status": "ok", "model": model_name, "requests_inflight": engine.num_inflight})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        text = metrics.render(llm, engine)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/segments")
    async def pin_segments(request: Request) -> JSONResponse:
        return ok(request, await segments.create(await request.body()))

    @app.get("/v1/segments")
    async def list_segments(request: Request) -> JSONResponse:
        return ok(request, await segments.list(request.query_params.get("namespace")))

    @app.delete("/v1/segments/{segment_id}")
    async def delete_segment(segment_id: str, request: Request) -> JSONResponse:
        return ok(request, await segments.delete(segment_id))

    return app


def _install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    """Every error leaves as OpenAI-style JSON; bad input is a 4xx, never a 500 or a traceback."""

    def reply(request: Request, err: APIError) -> JSONResponse:
        metrics.count_http(request.url.path, err.status)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return reply(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return reply(request, validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return reply(request, APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return reply(request, APIError(500, "internal server error", type="server_error", code="internal_error"))
