"""``create_app(llm, config)``: the FastAPI application (routes, auth, errors, lifespan).

    ServerMiddleware (requests in flight, /metrics by route template)
      -> routes (this file): admission, API key -> tenant, bounded JSON body
        -> OpenAIServing / SegmentService -> EngineLoop (one thread) -> LLM
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparsex.reuse.options import METHODS
from sparsex.server.config import ServerConfig
from sparsex.server.engine_api import context_limit
from sparsex.server.engine_loop import EngineLoop
from sparsex.server.lifecycle import Lifecycle, ServerMiddleware
from sparsex.server.limits import is_ascii_number, read_json
from sparsex.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from sparsex.server.placement import TenantEvents, cache_entries, cache_events
from sparsex.server.protocol import RETRY_HEADERS, APIError, bad_request, validation_error
from sparsex.server.segments import SegmentService
from sparsex.server.serving import OpenAIServing

if TYPE_CHECKING:
    from sparsex.server.engine_api import ServedLLM

log = logging.getLogger("sparsex.server")


def create_app(llm: ServedLLM, config: ServerConfig | None = None, **options: Any) -> FastAPI:
    """An OpenAI-compatible server over ``llm``; the engine thread lives as long as the app's lifespan.

    config: the server's options (``ServerConfig``); ``options`` override single fields of it,
        e.g. ``create_app(llm, max_queue=8, default_max_tokens=16)``.
    The app's ``state.lifecycle`` drains it (``DrainingServer`` calls that on SIGTERM).
    """
    cfg = dataclasses.replace(config or ServerConfig(), **options)
    events = TenantEvents(keyed=cfg.tenants.enabled)
    engine = EngineLoop(llm, max_queue=cfg.max_queue, max_queue_per_tenant=cfg.max_queue_per_tenant,
                        after_step=events.pull)
    metrics = ServerMetrics(METHODS, hide_cache_usage=cfg.hide_cache_usage)
    lifecycle = Lifecycle(engine, cfg.shutdown_grace_s)
    model_name = cfg.served_model_name or llm.model_name
    serving = OpenAIServing(llm, engine, metrics, model_name, cfg)
    segments = SegmentService(engine)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    # redirect_slashes=False: "/v1/segments/%2F" is a 404 for segment "/", not a 307 elsewhere.
    app = FastAPI(title="SparseX", version="0.1.0", lifespan=lifespan, redirect_slashes=False)
    app.state.llm = llm
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    app.state.config = cfg
    app.add_middleware(ServerMiddleware, lifecycle=lifecycle, metrics=metrics)
    _install_error_handlers(app)

    def admit(request: Request) -> str | None:
        """The request's tenant; 401 without a valid key, 503 while shutting down."""
        tenant = cfg.tenants.authenticate(request.headers.get("authorization"))
        if lifecycle.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        return tenant

    async def body_of(request: Request) -> dict[str, Any]:
        return await read_json(request, cfg.max_body_bytes, cfg.max_json_depth)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        tenant = admit(request)
        return await serving.chat(await body_of(request), request, tenant)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        tenant = admit(request)
        return await serving.completions(await body_of(request), request, tenant)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "sparsex",
                "max_model_len": context_limit(llm)}

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        admit(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> JSONResponse:
        admit(request)
        serving.check_model(model)
        return JSONResponse(model_card())

    @app.get("/health")
    async def health() -> JSONResponse:
        if lifecycle.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers=RETRY_HEADERS)
        if not engine.is_alive:
            return JSONResponse({"status": "engine not running"}, status_code=503, headers=RETRY_HEADERS)
        return JSONResponse({"status": "ok", "model": model_name, "requests_inflight": engine.num_inflight})

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if cfg.metrics == "off":
            raise APIError(404, "metrics are off on this server", type="not_found_error", code="not_found")
        if cfg.metrics == "key":
            scheme, _, key = (request.headers.get("authorization") or "").partition(" ")
            expected = f"{cfg.metrics_key}".encode()
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), expected):
                raise APIError(401, "/metrics needs the metrics key ('Authorization: Bearer <key>')",
                               code="invalid_api_key")
        return Response(metrics.render(llm, engine), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/segments")
    async def pin_segments(request: Request) -> JSONResponse:
        tenant = admit(request)
        return JSONResponse(await segments.create(await body_of(request), tenant))

    @app.get("/v1/segments")
    async def list_segments(request: Request) -> JSONResponse:
        tenant = admit(request)
        return JSONResponse(await segments.list(tenant, request.query_params.get("namespace")))

    @app.delete("/v1/segments/{segment_id:path}")
    async def delete_segment(segment_id: str, request: Request) -> JSONResponse:
        tenant = admit(request)
        return JSONResponse(await segments.delete(segment_id, tenant))

    @app.get("/v1/cache/entries")
    async def list_cache_entries(request: Request) -> JSONResponse:
        tenant = admit(request)
        return JSONResponse(await cache_entries(engine, tenant, request.query_params.get("namespace")))

    @app.get("/v1/cache/events")
    async def list_cache_events(request: Request) -> JSONResponse:
        tenant = admit(request)
        since = request.query_params.get("since", "0")
        if not is_ascii_number(since) or len(since) > 18:
            raise bad_request("since must be a non-negative integer (ASCII digits)", param="since")
        return JSONResponse(await cache_events(engine, events, tenant, int(since)))

    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI-style JSON; bad input is a 4xx, never a 500 or a traceback;
    a 429 or 503 says when to retry (``Retry-After``).

    (An unexpected exception becomes a 500 in ``ServerMiddleware``.)
    """

    def reply(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers())

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return reply(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return reply(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return reply(APIError(exc.status_code, str(exc.detail), type=kind))
