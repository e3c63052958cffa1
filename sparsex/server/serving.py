"""The OpenAI layer: validated bodies -> engine submissions -> JSON responses or SSE streams.

One HTTP request becomes ``len(prompts) * n`` engine requests (choice ``i = prompt * n + j``), all
added in one ``submit`` so that a bad prompt fails the whole request before any output. Prompts
are tokenized on the engine thread (the tokenizer belongs to the engine). The tenant (from the API
key, see ``auth.py``) prefixes the namespace of every request.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sparsex.core.engine import PromptTooLongError
from sparsex.reuse.options import METHODS
from sparsex.sampling_params import SamplingParams
from sparsex.server import responses as fmt
from sparsex.server.auth import engine_tenant, namespace_for
from sparsex.server.config import ServerConfig
from sparsex.server.engine_api import context_limit
from sparsex.server.engine_loop import AddFn, EngineLoop, EngineStoppedError, QueueFullError, Submission
from sparsex.server.metrics import ServerMetrics
from sparsex.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SparsexOptions,
    _SamplingFields,
    bad_request,
    parse_body,
)
from sparsex.server.responses import ChoiceState

if TYPE_CHECKING:
    from sparsex.core.request import Request as EngineRequest
    from sparsex.segments import SegmentSpan
    from sparsex.server.engine_api import ServedLLM

Encoder = Callable[["ServedLLM"], "tuple[list[int], list[SegmentSpan]]"]


class OpenAIServing:
    """Chat and text completions over an ``EngineLoop``; options in ``ServerConfig``."""

    def __init__(
        self, llm: ServedLLM, engine: EngineLoop, metrics: ServerMetrics, model_name: str, config: ServerConfig
    ) -> None:
        self.llm = llm
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.config = config
        self.reuse_methods = METHODS

    # ----- endpoints ---------------------------------------------------------------------------

    async def chat(self, raw: dict[str, Any], request: Request, tenant: str | None) -> Response:
        body = parse_body(ChatCompletionRequest, raw)
        self.check_model(body.model)
        messages = body.message_dicts()
        options, namespace = self.engine_kwargs(body, tenant)

        def encode(llm: ServedLLM) -> tuple[list[int], list[SegmentSpan]]:
            try:
                parts = llm.tokenizer.chat_parts(messages, namespace=namespace)
            except ValueError as e:
                raise bad_request(str(e), param="messages") from None
            return llm.tokenizer.encode_prompt(parts, source="chat")

        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        max_tokens = body.max_completion_tokens or body.max_tokens
        add = self.make_add([encode], body, max_tokens, body.logprobs, options, rid, "messages")
        sub = await self.submit(add, body.n, tenant)
        head = fmt.Head(rid, int(time.time()), self.model_name, body.n, self.config.hide_cache_usage)
        top = body.top_logprobs or 0
        if body.stream:
            return self.sse(sub, fmt.chat_stream(self.events(sub), head, body.stop_list(), top, body.include_usage))
        states = await self.collect(sub, request)
        return JSONResponse(fmt.chat_response(states, head, body.logprobs, top))

    async def completions(self, raw: dict[str, Any], request: Request, tenant: str | None) -> Response:
        body = parse_body(CompletionRequest, raw)
        self.check_model(body.model)
        options, _ = self.engine_kwargs(body, tenant)
        encoders = [_encoder(p) for p in body.prompt_list()]
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        add = self.make_add(encoders, body, body.max_tokens, body.logprobs is not None, options, rid, "prompt")
        sub = await self.submit(add, body.n * len(encoders), tenant)
        head = fmt.Head(rid, int(time.time()), self.model_name, body.n, self.config.hide_cache_usage)
        if body.stream:
            stream = fmt.completion_stream(self.events(sub), head, body.stop_list(), body.logprobs,
                                           body.include_usage)
            return self.sse(sub, stream)
        states = await self.collect(sub, request)
        return JSONResponse(fmt.completion_response(states, head, body.logprobs))

    # ----- request -> engine -----------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_name, self.llm.model_name):
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def engine_kwargs(self, body: _SamplingFields, tenant: str | None) -> tuple[dict[str, Any], str]:
        """The keyword arguments for ``add_choices`` (per-request ``reuse``, the tenant the engine
        schedules it for), and the namespace.

        The ``sparsex`` object becomes ``reuse={"method", "budget", "namespace"}`` (the fields
        given). The namespace is the client's (``sparsex.namespace``, else ``cache_salt``, else the
        engine's default) inside the tenant's: ``auth.namespace_for``.
        """
        sx = body.sparsex or SparsexOptions()
        method = sx.reuse or self.config.default_reuse
        if method is not None and method not in self.reuse_methods:
            raise bad_request(f"unknown reuse method {method!r}; expected one of {list(self.reuse_methods)}",
                              param="sparsex.reuse", code="invalid_reuse")
        own = sx.namespace if sx.namespace is not None else body.cache_salt
        namespace = namespace_for(tenant, own if own is not None else self.llm.reuse.namespace)
        wanted = {"method": method, "budget": sx.budget, "namespace": namespace}
        overrides = {k: v for k, v in wanted.items() if v is not None}
        return {"reuse": overrides, "tenant": engine_tenant(tenant)}, namespace

    def sampling_params(
        self, body: _SamplingFields, prompt_len: int, choice: int, max_tokens: int | None, logprobs: bool
    ) -> SamplingParams:
        if max_tokens is None:
            max_tokens = max(1, min(self.config.default_max_tokens, context_limit(self.llm) - prompt_len))
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            seed=None if body.seed is None else (body.seed + choice) % (1 << 63),  # n > 1: distinct
            stop=body.stop_list(),
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
        )

    def make_add(
        self,
        encoders: list[Encoder],
        body: _SamplingFields,
        max_tokens: int | None,
        logprobs: bool,
        options: dict[str, Any],
        rid: str,
        param: str,
    ) -> AddFn:
        """The function the engine thread runs: tokenize each prompt and add its ``n`` requests."""

        def add(llm: ServedLLM) -> list[EngineRequest]:
            reqs: list[EngineRequest] = []
            try:
                for encode in encoders:
                    ids, spans = encode(llm)
                    choices = [self.sampling_params(body, len(ids), j, max_tokens, logprobs) for j in range(body.n)]
                    for params in choices:
                        _check_context(len(ids), params.max_tokens, context_limit(llm), param)
                    # The n choices of a prompt share one prefill (the engine forks its KV).
                    rids = [f"{rid}-{len(reqs) + j}" for j in range(body.n)]
                    reqs += llm.add_choices(ids, choices, spans, request_ids=rids, **options)
            except BaseException:
                for r in reqs:  # all or nothing
                    llm.abort(r)
                raise
            return reqs

        return add

    async def submit(self, add: AddFn, num_requests: int, tenant: str | None) -> Submission:
        return await submit(self.engine, add, num_requests, param="n", tenant=tenant)

    # ----- engine -> response ----------------------------------------------------------------------

    async def events(self, sub: Submission) -> AsyncIterator[ChoiceState]:
        """The choices' states, one update per engine event, until every request finished."""
        states = [ChoiceState(i) for i in range(len(sub.request_ids))]
        pending = len(states)
        while pending:
            ev = await sub.events.get()
            s = states[ev.index]
            s.update(ev)
            if s.finished:
                pending -= 1
                if s.metrics is not None:
                    self.metrics.observe_request(s.metrics, s.finish_reason)
            yield s

    async def collect(self, sub: Submission, request: Request) -> list[ChoiceState]:
        """Wait for every choice; a client that disconnects meanwhile gets its requests aborted."""
        watcher = asyncio.create_task(_abort_on_disconnect(request, self.engine, sub))
        states: dict[int, ChoiceState] = {}
        try:
            async for s in self.events(sub):
                states[s.index] = s
        finally:
            watcher.cancel()
        out = [states[i] for i in range(len(sub.request_ids))]
        fmt.raise_for_failed(out)
        return out

    def sse(self, sub: Submission, chunks: AsyncIterator[str]) -> Response:
        return _SSEResponse(chunks, on_close=lambda: self.engine.abort(sub))


async def submit(engine: EngineLoop, add: AddFn, num_requests: int, param: str, tenant: str | None) -> Submission:
    """Hand ``add`` to the engine thread, mapping its failures to HTTP errors."""
    if num_requests > engine.tenant_limit:  # can never be admitted: a 429 would invite a retry
        raise bad_request(f"{num_requests} engine requests exceed this server's limit of {engine.tenant_limit} "
                          "in flight", param=param, code="too_many_choices")
    try:
        return await engine.submit(add, num_requests, tenant)
    except APIError:
        raise
    except QueueFullError as e:
        raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
    except EngineStoppedError as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down") from None
    except PromptTooLongError as e:
        raise bad_request(str(e), code="context_length_exceeded") from None
    except (ValueError, TypeError) as e:
        raise bad_request(str(e), param=param if param != "n" else None, code="invalid_value") from None


def _check_context(num_prompt: int, max_tokens: int, limit: int, param: str) -> None:
    if num_prompt + max_tokens > limit:
        raise bad_request(
            f"this model's context is {limit} tokens, but {num_prompt} prompt tokens + max_tokens {max_tokens} "
            f"= {num_prompt + max_tokens} were requested",
            param=param,
            code="context_length_exceeded",
        )


def _encoder(prompt: str | list[int]) -> Encoder:
    def encode(llm: ServedLLM) -> tuple[list[int], list[SegmentSpan]]:
        return llm.tokenizer.encode_prompt(prompt)

    return encode


async def _abort_on_disconnect(request: Request, engine: EngineLoop, sub: Submission) -> None:
    """Block on the ASGI receive channel (the body is already read) until the client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            engine.abort(sub)
            return


class _SSEResponse(StreamingResponse):
    """A server-sent event stream that runs ``on_close`` however it ends (done, disconnect, error)."""

    def __init__(self, chunks: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()  # aborting finished requests is a no-op
