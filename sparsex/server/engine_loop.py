"""The engine loop: one thread owns the (not thread-safe) ``LLM``; handlers talk to it by message.

    handler (event loop)                          engine thread
    ─────────────────────                         ─────────────────────────────────────────
    await submit(add_fn) ── inbox (SimpleQueue) ─> add_fn(llm) -> [Request, ...]; track them
          <─ future resolved (call_soon_threadsafe)
    await events.get()   <─ TokenEvent per step ── llm.step() while there is work
    abort(submission)    ── inbox ──────────────> llm.abort(req): blocks freed at once
    abort_all()          ── inbox ──────────────> every tracked request aborted (shutdown)
    await call(fn)       ── inbox ──────────────> fn(llm) (segment pinning, ...)

Continuous batching is the engine's: requests added between two steps join the next decode batch.
Everything that touches ``llm`` (tokenizing, adding, stepping, aborting) runs on the engine thread;
the only shared state is the inbox and the in-flight counter (under a lock).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from sparsex.core.request import Request, RequestMetrics
    from sparsex.server.engine_api import ServedLLM

log = logging.getLogger("sparsex.server")

T = TypeVar("T")
AddFn = Callable[["ServedLLM"], "list[Request]"]


class QueueFullError(Exception):
    """More requests in flight than ``max_queue``."""


class EngineStoppedError(Exception):
    """The engine loop is shut down (or shutting down)."""


@dataclass(frozen=True)
class TokenEvent:
    """A snapshot of one engine request after a step, sent to the handler that owns it.

    index: position of the request in its submission (the OpenAI choice index).
    text: the full text so far (stop strings removed).
    new_token_ids: tokens generated since the previous event.
    new_logprobs: their log-probabilities.
    new_token_texts: each new token decoded alone (only when the request asked for logprobs).
    finish_reason: ``stop``, ``length``, ``abort`` or ``error`` once finished, else None.
    metrics: a copy of the request's metrics, once finished.
    """

    index: int
    text: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    new_token_texts: list[str]
    finish_reason: str | None
    metrics: RequestMetrics | None


@dataclass
class Submission:
    """What a handler holds for one HTTP request: its engine requests and their event queue."""

    request_ids: list[str]
    events: asyncio.Queue[TokenEvent]
    prompt_lengths: list[int] = field(default_factory=list)


@dataclass
class _Tracked:
    req: Request
    index: int
    events: asyncio.Queue[TokenEvent]
    loop: asyncio.AbstractEventLoop
    tenant: str | None
    num_sent: int = 0


@dataclass
class _Add:
    add: AddFn
    num_requests: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Submission]
    events: asyncio.Queue[TokenEvent]
    tenant: str | None


@dataclass
class _Call:
    fn: Callable[[ServedLLM], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


@dataclass
class _Abort:
    request_ids: list[str]


class _AbortAll:
    pass


class _Stop:
    pass


_Command = _Add | _Call | _Abort | _AbortAll | _Stop


def _resolve(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class EngineLoop:
    """Runs ``llm.step()`` on one background thread while there is work.

    max_queue: most engine requests in flight (waiting + running) before ``submit`` refuses.
    max_queue_per_tenant: most of them one tenant may hold (None: no limit but ``max_queue``), so
        that one tenant's flood cannot fill the queue for the others.
    after_step: called with the engine on the engine thread after every step and every batch of
        commands (the server numbers store events per tenant there); a failure is logged, never raised.
    """

    def __init__(self, llm: ServedLLM, max_queue: int = 256, max_queue_per_tenant: int | None = None,
                 after_step: Callable[[ServedLLM], None] | None = None) -> None:
        if max_queue < 1 or (max_queue_per_tenant is not None and max_queue_per_tenant < 1):
            raise ValueError(f"max_queue and max_queue_per_tenant must be >= 1, got {max_queue}, {max_queue_per_tenant}")
        self.llm = llm
        self.max_queue = max_queue
        self.max_queue_per_tenant = max_queue_per_tenant
        self._inflight_of: dict[str | None, int] = {}  # guarded by _lock: requests in flight per tenant
        self._after_step = after_step
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._num_inflight = 0  # guarded by _lock
        self._closed = False  # guarded by _lock
        self._admitting = True  # guarded by _lock; False once draining: submit refuses, call still works
        self._thread: threading.Thread | None = None
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self.num_aborted = 0  # requests aborted before they finished (written by the engine thread)

    # ----- lifecycle (any thread) ----------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._run, name="sparsex-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort every request in flight and stop the thread (idempotent)."""
        with self._lock:
            if self._closed:
                thread = self._thread
            else:
                self._closed = True
                self._inbox.put(_Stop())
                thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def close_admission(self) -> None:
        """Refuse new submissions (EngineStoppedError); requests in flight go on (a draining server)."""
        with self._lock:
            self._admitting = False

    def abort_all(self) -> None:
        """Abort every request in flight, including those whose ``submit`` is still queued."""
        with self._lock:
            if not self._closed:
                self._inbox.put(_AbortAll())

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_inflight(self) -> int:
        with self._lock:
            return self._num_inflight

    # ----- handler side (event loop thread) ------------------------------------------------------

    @property
    def tenant_limit(self) -> int:
        """The most engine requests one tenant may have in flight."""
        return min(self.max_queue, self.max_queue_per_tenant or self.max_queue)

    async def submit(self, add: AddFn, num_requests: int, tenant: str | None = None) -> Submission:
        """Run ``add(llm)`` on the engine thread; its requests then stream ``TokenEvent``s.

        Raises QueueFullError past ``max_queue`` (or ``tenant``'s share of it), EngineStoppedError
        after ``stop``, and whatever ``add`` raised (ValueError for a bad prompt or parameters).
        """
        self.start()
        loop = asyncio.get_running_loop()
        cmd = _Add(add, num_requests, loop, loop.create_future(), asyncio.Queue(), tenant)
        with self._lock:
            if self._closed or not self._admitting:
                raise EngineStoppedError("the server is shutting down")
            if self._num_inflight + num_requests > self.max_queue:
                raise QueueFullError(
                    f"too many requests in flight ({self._num_inflight} + {num_requests} > {self.max_queue})"
                )
            own = self._inflight_of.get(tenant, 0)
            if own + num_requests > self.tenant_limit:
                raise QueueFullError(f"too many of this tenant's requests in flight ({own} + {num_requests} > "
                                     f"{self.tenant_limit})")
            self._num_inflight += num_requests
            self._inflight_of[tenant] = own + num_requests
            self._inbox.put(cmd)
        try:
            return await asyncio.shield(cmd.future)
        except asyncio.CancelledError:
            # The handler went away while the requests were being added: abort them once added.
            cmd.future.add_done_callback(self._abort_added)
            raise

    def _abort_added(self, future: asyncio.Future[Submission]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.abort(future.result())

    def abort(self, sub: Submission) -> None:
        """Abort the submission's unfinished requests (non-blocking; a no-op for finished ones)."""
        with self._lock:
            if not self._closed:
                self._inbox.put(_Abort(list(sub.request_ids)))

    async def call(self, fn: Callable[[ServedLLM], T]) -> T:
        """Run ``fn(llm)`` on the engine thread between two steps and return its result."""
        self.start()
        loop = asyncio.get_running_loop()
        cmd = _Call(fn, loop, loop.create_future())
        with self._lock:
            if self._closed:
                raise EngineStoppedError("the server is shutting down")
            self._inbox.put(cmd)
        result: T = await asyncio.shield(cmd.future)
        return result

    # ----- engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        llm = self.llm
        while True:
            for cmd in self._next_commands(block=not llm.has_unfinished()):
                if isinstance(cmd, _Stop):
                    self._shutdown()
                    return
                try:
                    self._execute(cmd)
                except Exception:  # keep serving the other requests
                    log.exception("engine command failed")
            self._report_changes()  # a command may have stepped the engine (pinning runs requests)
            if llm.has_unfinished() and not self._step():
                time.sleep(0.002)  # work is queued but nothing is schedulable yet: don't spin
            if self._after_step is not None:
                try:
                    self._after_step(llm)
                except Exception:
                    log.exception("after-step hook failed")

    def _next_commands(self, block: bool) -> list[_Command]:
        cmds: list[_Command] = [self._inbox.get()] if block else []
        while True:
            try:
                cmds.append(self._inbox.get_nowait())
            except queue.Empty:
                return cmds

    def _execute(self, cmd: _Command) -> None:
        if isinstance(cmd, _Add):
            self._add(cmd)
        elif isinstance(cmd, _Abort):
            for rid in cmd.request_ids:
                t = self._tracked.get(rid)
                if t is not None:
                    self._abort(t)
        elif isinstance(cmd, _AbortAll):
            for t in list(self._tracked.values()):
                self._abort(t)
        elif isinstance(cmd, _Call):
            try:
                result, exc = cmd.fn(self.llm), None
            except Exception as e:  # handed to the caller, who maps it to an HTTP error
                result, exc = None, e
            self._reply(cmd.loop, cmd.future, result, exc)

    def _abort(self, t: _Tracked) -> None:
        self.num_aborted += 1
        self.llm.abort(t.req)
        self._emit(t)

    def _add(self, cmd: _Add) -> None:
        try:
            reqs = cmd.add(self.llm)
        except Exception as e:
            self._release(cmd.num_requests, cmd.tenant)
            self._reply(cmd.loop, cmd.future, None, e)
            return
        self._release(cmd.num_requests - len(reqs), cmd.tenant)
        for i, r in enumerate(reqs):
            self._tracked[r.request_id] = _Tracked(r, i, cmd.events, cmd.loop, cmd.tenant)
        sub = Submission([r.request_id for r in reqs], cmd.events, [len(r.prompt_token_ids) for r in reqs])
        self._reply(cmd.loop, cmd.future, sub, None)

    def _step(self) -> bool:
        """One engine step; returns whether it did anything.

        Every tracked request that changed is reported, not only those ``step`` returned: a request
        that got tokens or finished without being returned (a follower sharing its leader's prefill,
        a request failed inside the step, one stepped by ``cache_segments``) must never leave its
        handler waiting forever. The scan costs O(requests in flight), at most ``max_queue``.
        """
        try:
            reqs = self.llm.step()
        except Exception:
            log.exception("engine step failed")
            self._fail_after_error()
            return True
        self._report_changes()
        return bool(reqs)

    def _report_changes(self) -> None:
        """Emit an event for every tracked request with new tokens or finished since its last one."""
        for t in list(self._tracked.values()):
            if t.req.finished or len(t.req.output_token_ids) > t.num_sent:
                self._emit(t)

    def _fail_after_error(self) -> None:
        """A failed prefill finished its own request; a failed decode leaves the batch unknown."""
        failed = [t for t in self._tracked.values() if t.req.finished]
        if not failed:
            failed = list(self._tracked.values())
            for t in failed:
                t.req.finish_reason = "error"
                self.llm.abort(t.req)
        for t in failed:
            self._emit(t)

    def _emit(self, t: _Tracked) -> None:
        """Send the request's news to its handler; a failure to build the event (detokenizing,
        say) fails this request alone, never the loop."""
        r = t.req
        n = len(r.output_token_ids)
        try:
            new_ids = r.output_token_ids[t.num_sent : n]
            texts = [self.llm.tokenizer.decode([i]) for i in new_ids] if r.params.logprobs else []
            ev = TokenEvent(
                index=t.index,
                text=r.text,
                new_token_ids=new_ids,
                new_logprobs=r.output_logprobs[t.num_sent : n],
                new_token_texts=texts,
                finish_reason=r.finish_reason if r.finished else None,
                metrics=copy.deepcopy(r.metrics) if r.finished else None,
            )
        except Exception:
            log.exception("reporting request %s failed", r.request_id)
            if not r.finished:
                r.finish_reason = "error"
                self.llm.abort(r)
            r.finish_reason = "error"
            ev = TokenEvent(t.index, "", [], [], [], "error", None)
        t.num_sent = n
        if r.finished:
            del self._tracked[r.request_id]
            self._release(1, t.tenant)
            if r.finish_reason == "error":  # the engine keeps a failed request's error until asked
                err = self.llm.error_of(r)
                log.warning("request %s failed: %s", r.request_id, type(err).__name__ if err else "unknown error")
        try:
            t.loop.call_soon_threadsafe(t.events.put_nowait, ev)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _reply(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, exc: Exception | None
    ) -> None:
        try:
            loop.call_soon_threadsafe(_resolve, future, result, exc)
        except RuntimeError:
            pass

    def _release(self, num: int, tenant: str | None) -> None:
        with self._lock:
            self._num_inflight -= num
            left = self._inflight_of.get(tenant, 0) - num
            if left > 0:
                self._inflight_of[tenant] = left
            else:
                self._inflight_of.pop(tenant, None)

    def _shutdown(self) -> None:
        for t in list(self._tracked.values()):
            self._abort(t)
        # Commands queued before the stop marker were already executed; none can follow it.
