"""Admission and clean shutdown: a draining state, the HTTP middleware, and the uvicorn server.

SIGTERM (or Ctrl-C) starts a drain instead of uvicorn's own shutdown:

    SIGTERM ─> close admission: new API requests get 503 JSON, /health says "draining" (503)
            ─> wait up to shutdown_grace_s for the requests in flight to finish
            ─> abort the rest: a non-streaming request answers 503 JSON, a stream sends an SSE
               error event and ``data: [DONE]``
            ─> wait (briefly) for those responses to be written, then let uvicorn exit: status 0,
               nothing left for it to cancel, so no traceback in the log

A second signal skips what is left of the grace period.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

from sparsex.server.engine_loop import EngineLoop
from sparsex.server.metrics import ServerMetrics
from sparsex.server.protocol import APIError

log = logging.getLogger("sparsex.server")

# Not counted as requests in flight (they are answered at once and must work while draining).
_UNTRACKED = ("/health", "/metrics")
FLUSH_TIMEOUT_S = 10.0  # after the abort, how long responses get to be written
_INTERNAL_ERROR = json.dumps(
    APIError(500, "internal server error", type="server_error", code="internal_error").body()
).encode()


class Lifecycle:
    """Whether the server admits requests, and how many API requests are being answered."""

    def __init__(self, engine: EngineLoop, grace_s: float) -> None:
        self.engine = engine
        self.grace_s = grace_s
        self.draining = False
        self.num_active = 0  # event loop thread only
        self._skip_grace = False

    async def drain(self) -> None:
        """Stop admission, give running requests the grace period, end the rest with an error."""
        if self.draining:
            return
        self.draining = True
        self.engine.close_admission()
        log.info("shutting down: %d request(s) in flight, %.1f s grace", self.num_active, self.grace_s)
        await self._wait_idle(self.grace_s)
        if self.num_active:
            log.info("grace period over: ending %d request(s) with an error", self.num_active)
            self.engine.abort_all()
            self._skip_grace = False
            await self._wait_idle(FLUSH_TIMEOUT_S)

    def hurry(self) -> None:
        """A second signal: skip the rest of the grace period."""
        self._skip_grace = True

    async def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.num_active and time.monotonic() < deadline and not self._skip_grace:
            await asyncio.sleep(0.05)


class ServerMiddleware:
    """Pure ASGI middleware: counts API requests in flight and every request in ``/metrics``.

    The route label is the matched route's template (set by the router in the shared scope), never
    the raw path; an unknown path is ``unmatched``.
    """

    def __init__(self, app: Any, lifecycle: Lifecycle, metrics: ServerMetrics) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        status_sent: int | None = None
        tracked = scope.get("path") not in _UNTRACKED

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status, status_sent
            if message["type"] == "http.response.start":
                status = status_sent = int(message["status"])
            await send(message)

        if tracked:
            self.lifecycle.num_active += 1
        try:
            await self.app(scope, receive, send_status)
        except Exception:  # a bug, not bad input: a 500 without details, and the connection lives on
            log.exception("unhandled error on %s %r", scope.get("method"), scope.get("path"))
            if status_sent is None:
                status = 500
                await send_status({"type": "http.response.start", "status": 500,
                                   "headers": [(b"content-type", b"application/json")]})
                await send_status({"type": "http.response.body", "body": _INTERNAL_ERROR})
        finally:
            if tracked:
                self.lifecycle.num_active -= 1
            route = scope.get("route")
            template = getattr(route, "path", None)
            self.metrics.count_http(template if isinstance(template, str) else "unmatched",
                                    str(scope.get("method", "")), status)


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM / SIGINT starting ``Lifecycle.drain`` and exit status 0 afterwards."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self._drain_requested = False
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise the signal after shutdown (exit -15).
        if self._drain_requested:
            self.lifecycle.hurry()
            if sig == signal.SIGINT and self.should_exit:
                self.force_exit = True
            return
        self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain is None:
            self._drain = asyncio.create_task(self.lifecycle.drain())
        if self._drain is not None and self._drain.done():
            self.should_exit = True
        return await super().on_tick(counter)
