"""OpenAI response bodies and SSE chunks, built from the per-choice state of engine events.

Streaming sends text through ``sparsex.detokenize.TextCursor``: it holds back the last
``len(longest stop) - 1`` characters (a stop string may still be completing there) and a trailing
U+FFFD (a UTF-8 character split across tokens), so text already sent never has to be taken back.

``Head.hide_cache_usage`` leaves the cache fields out of usage and the ``sparsex`` block: whether a
prompt hit the cache tells a client what someone else sent before (see README, security notes).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sparsex.detokenize import TextCursor
from sparsex.server.protocol import APIError

if TYPE_CHECKING:
    from sparsex.core.request import RequestMetrics
    from sparsex.server.engine_loop import TokenEvent


@dataclass
class ChoiceState:
    """Everything received so far for one choice (one engine request).

    new_*: what the latest event added (what a stream chunk reports).
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    new_logprobs: list[float] = field(default_factory=list)
    new_token_texts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None

    def update(self, ev: TokenEvent) -> None:
        self.text = ev.text
        self.token_ids.extend(ev.new_token_ids)
        self.logprobs.extend(ev.new_logprobs)
        self.token_texts.extend(ev.new_token_texts)
        self.new_logprobs = ev.new_logprobs
        self.new_token_texts = ev.new_token_texts
        self.finish_reason = ev.finish_reason
        self.metrics = ev.metrics

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Head:
    """The fields every response / chunk of one HTTP request shares; ``n`` choices per prompt.

    hide_cache_usage: leave out the cache fields (usage details, compute fraction).
    """

    id: str
    created: int
    model: str
    n: int
    hide_cache_usage: bool = False


def failure(finish_reason: str | None) -> APIError | None:
    """The error a choice that ended this way reports (None for ``stop`` / ``length``)."""
    if finish_reason == "error":
        return APIError(500, "the engine failed while serving this request", type="server_error",
                        code="engine_error")
    if finish_reason == "abort":
        return APIError(503, "the request was aborted (the client went away or the server is shutting down)",
                        type="server_error", code="aborted")
    return None


def raise_for_failed(states: list[ChoiceState]) -> None:
    for reason in ("error", "abort"):
        err = failure(reason) if any(s.finish_reason == reason for s in states) else None
        if err is not None:
            raise err


def _logprob(value: float) -> float:
    """A JSON-safe logprob: -inf / NaN (probability 0, broken logits) become -9999.0, as in OpenAI's API."""
    return value if math.isfinite(value) else -9999.0


def usage(states: list[ChoiceState], n: int, hide_cache_usage: bool = False) -> dict[str, Any]:
    """Token counts; a prompt's counts come once, from its first choice (the others share it)."""
    prompt = [s.metrics for s in states[::n] if s.metrics is not None]
    num_prompt = sum(m.num_prompt_tokens for m in prompt)
    num_completion = sum(len(s.token_ids) for s in states)
    prefix = sum(m.num_prefix_hit_tokens for m in prompt)
    segment = sum(m.num_segment_hit_tokens for m in prompt)
    counts = {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
    }
    if hide_cache_usage:
        return counts
    return {
        **counts,
        "prompt_tokens_details": {"cached_tokens": prefix + segment},
        "prefix_hit_tokens": prefix,
        "segment_hit_tokens": segment,
        "recomputed_tokens": sum(m.num_recomputed_tokens for m in prompt),
    }


def sparsex_info(states: list[ChoiceState], hide_cache_usage: bool = False) -> dict[str, Any]:
    """Extension: how the prompts were served (reuse method, work done, TTFT)."""
    ms = [s.metrics for s in states if s.metrics is not None]
    if not ms:
        return {}
    if hide_cache_usage:
        return {"reuse": ms[0].reuse}
    return {
        "reuse": ms[0].reuse,
        "compute_fraction": min(m.compute_fraction for m in ms),
        "ttft_s": min(m.ttft_s for m in ms),
    }


# ----- chat --------------------------------------------------------------------------------------


def _chat_logprobs(texts: list[str], logprobs: list[float], top: int) -> dict[str, Any]:
    entries = []
    for t, lp in zip(texts, logprobs, strict=True):
        entry = {"token": t, "logprob": _logprob(lp), "bytes": list(t.encode("utf-8", "replace"))}
        # The engine reports only the sampled token's logprob; it is the one "top" entry we know.
        entries.append({**entry, "top_logprobs": [entry] if top > 0 else []})
    return {"content": entries}


def _envelope(
    obj: str, states: list[ChoiceState], head: Head, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    """The body shared by chat and text completions: ids, choices, usage and cache statistics."""
    return {
        "id": head.id,
        "object": obj,
        "created": head.created,
        "model": head.model,
        "choices": choices,
        "usage": usage(states, head.n, head.hide_cache_usage),
        "sparsex": sparsex_info(states, head.hide_cache_usage),
    }


def chat_response(states: list[ChoiceState], head: Head, logprobs: bool, top: int) -> dict[str, Any]:
    choices = [
        {
            "index": s.index,
            "message": {"role": "assistant", "content": s.text},
            "logprobs": _chat_logprobs(s.token_texts, s.logprobs, top) if logprobs else None,
            "finish_reason": s.finish_reason,
        }
        for s in states
    ]
    return _envelope("chat.completion", states, head, choices)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(err: APIError) -> str:
    return sse(err.body())


async def chat_stream(
    events: AsyncIterator[ChoiceState], head: Head, stops: list[str], top: int, include_usage: bool
) -> AsyncIterator[str]:
    base = {"id": head.id, "object": "chat.completion.chunk", "created": head.created, "model": head.model}
    extra = {"usage": None} if include_usage else {}
    cursors: dict[int, TextCursor] = {}
    done: list[ChoiceState] = []
    async for s in events:
        if s.index not in cursors:
            cursors[s.index] = TextCursor(stops)
            role = {"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}
            yield sse({**base, "choices": [role], **extra})
        err = failure(s.finish_reason)
        if err is not None:
            yield sse_error(err)
            yield SSE_DONE
            return
        delta = cursors[s.index].advance(s.text, s.finished)
        lp = _chat_logprobs(s.new_token_texts, s.new_logprobs, top) if s.new_token_texts else None
        if delta or lp or s.finished:
            choice = {"index": s.index, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                      "finish_reason": s.finish_reason}
            yield sse({**base, "choices": [choice], **extra})
        if s.finished:
            done.append(s)
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(sorted(done, key=lambda s: s.index), head.n, head.hide_cache_usage)})
    yield SSE_DONE


# ----- text completions --------------------------------------------------------------------------


def _completion_logprobs(texts: list[str], logprobs: list[float], top: int, offset: int) -> dict[str, Any]:
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": texts,
        "token_logprobs": [_logprob(lp) for lp in logprobs],
        "top_logprobs": [{t: _logprob(lp)} for t, lp in zip(texts, logprobs, strict=True)] if top > 0 else None,
        "text_offset": offsets,
    }


def completion_response(states: list[ChoiceState], head: Head, logprobs: int | None) -> dict[str, Any]:
    choices = [
        {
            "index": s.index,
            "text": s.text,
            "logprobs": None if logprobs is None else _completion_logprobs(s.token_texts, s.logprobs, logprobs, 0),
            "finish_reason": s.finish_reason,
        }
        for s in states
    ]
    return _envelope("text_completion", states, head, choices)


async def completion_stream(
    events: AsyncIterator[ChoiceState], head: Head, stops: list[str], logprobs: int | None, include_usage: bool
) -> AsyncIterator[str]:
    base = {"id": head.id, "object": "text_completion", "created": head.created, "model": head.model}
    extra = {"usage": None} if include_usage else {}
    cursors: dict[int, TextCursor] = {}
    offsets: dict[int, int] = {}
    done: list[ChoiceState] = []
    async for s in events:
        err = failure(s.finish_reason)
        if err is not None:
            yield sse_error(err)
            yield SSE_DONE
            return
        cursor = cursors.setdefault(s.index, TextCursor(stops))
        delta = cursor.advance(s.text, s.finished)
        lp = None
        if logprobs is not None and s.new_token_texts:
            lp = _completion_logprobs(s.new_token_texts, s.new_logprobs, logprobs, offsets.get(s.index, 0))
            offsets[s.index] = offsets.get(s.index, 0) + sum(len(t) for t in s.new_token_texts)
        if delta or lp or s.finished:
            choice = {"index": s.index, "text": delta, "logprobs": lp, "finish_reason": s.finish_reason}
            yield sse({**base, "choices": [choice], **extra})
        if s.finished:
            done.append(s)
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(sorted(done, key=lambda s: s.index), head.n, head.hide_cache_usage)})
    yield SSE_DONE
