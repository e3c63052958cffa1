"""``LLM``: the public Python API over the engine core (``sparsex.core.engine.EngineCore``).

    LLM.generate / chat / stream / next_token_logprobs / cache_segments
      -> add_request (tokenize, validate) -> EngineCore.add -> EngineCore.step() ... -> RequestOutput

Everything here is built on four engine calls: ``new_request``, ``add``, ``step`` and ``error_of``.
The engine's parts (pool, KV, caches, runner, tiers) are on ``llm.engine`` for analysis.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Unpack

import numpy as np

from sparsex.cache import BlockPool
from sparsex.config import EngineConfig, EngineOptions
from sparsex.core.engine import EngineCore, PromptTooLongError, ReuseArg
from sparsex.core.outputs import RequestOutput, output_of
from sparsex.core.request import DEFAULT_TENANT, PinSpec, Request
from sparsex.detokenize import TextCursor
from sparsex.kv.policy import CachePolicy
from sparsex.kvevents import KVEventRecorder
from sparsex.models.base import ModelSpec
from sparsex.reuse.options import MethodOptions, ReuseOptions, resolve_reuse
from sparsex.reuse.planner import Method
from sparsex.sampling_params import SamplingParams
from sparsex.segments import Prompt, SegmentSpan
from sparsex.tokenizer import Tokenizer

__all__ = ["LLM", "PromptTooLongError", "RequestOutput"]


class LLM:
    """A loaded model with its KV cache, serving prompts.

    >>> llm = LLM()  # default model (SmolLM2-135M-Instruct) on CPU
    >>> llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))[0].text

    Options: an ``EngineConfig`` (``config=``) or its fields as keyword arguments;
    ``reuse``: the requests' default reuse method and options; ``planners``: more reuse methods by
    name (the evaluation lab's analysis-only ones).
    """

    def __init__(
        self, model: str | None = None, *, config: EngineConfig | None = None, reuse: ReuseArg = None,
        planners: Mapping[str, Method[Any]] | None = None, **options: Unpack[EngineOptions],
    ) -> None:
        if config is not None and (options or model is not None):
            raise ValueError("give either config= or the engine's options, not both")
        self.config = config or EngineConfig(model=model, **options)
        self.engine = EngineCore(self.config, reuse, planners)
        self.model_name = self.config.model or "smollm2"

    # ----- what the engine is ------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def spec(self) -> ModelSpec:
        return self.engine.spec

    @property
    def pool(self) -> BlockPool:
        """The KV block pool (its counters: blocks, free, pinned, usage)."""
        return self.engine.pool

    @property
    def reuse(self) -> ReuseOptions:
        """The requests' default reuse."""
        return self.engine.reuse

    @property
    def methods(self) -> dict[str, type[MethodOptions]]:
        """The reuse methods this engine runs, with their option types."""
        return self.engine.method_options

    # ----- requests ----------------------------------------------------------------------------

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
        reuse: ReuseArg = None, keep_first_logits: bool | int = False, tenant: str = DEFAULT_TENANT,
    ) -> Request:
        """Queue ``prompt``. ``keep_first_logits`` keeps the first token's distribution and the
        recomputed positions (``RequestOutput.first_logprobs``, analysis); an int ``n`` also keeps
        the distributions of the first ``n`` generated tokens (``step_logprobs``). ``tenant``: who
        the request is scheduled for."""
        ids, spans = self.tokenizer.encode_prompt(prompt)
        return self.add_tokenized(ids, params or SamplingParams(), spans, request_id, reuse, keep_first_logits,
                                  tenant)

    def add_tokenized(
        self, ids: list[int], params: SamplingParams, spans: Sequence[SegmentSpan] = (),
        request_id: str | None = None, reuse: ReuseArg = None, keep_first_logits: bool | int = False,
        tenant: str = DEFAULT_TENANT,
    ) -> Request:
        """Queue a tokenized prompt (``spans``: its segments)."""
        req = self.engine.new_request(ids, params, spans, request_id, reuse, tenant, int(keep_first_logits))
        return self.engine.add(req)

    def add_choices(
        self, ids: list[int], params: Sequence[SamplingParams], spans: Sequence[SegmentSpan] = (),
        request_ids: Sequence[str] | None = None, reuse: ReuseArg = None, tenant: str = DEFAULT_TENANT,
    ) -> list[Request]:
        """``len(params)`` choices of one prompt that share one prefill: the first is prefilled, the
        others copy its prompt KV and sample their first token from the same logits, each with its
        own sampling parameters (seed). Aborting the first before its prefill aborts them all."""
        if not params:
            raise ValueError("at least one choice is needed")
        rids = list(request_ids) if request_ids is not None else [None] * len(params)
        leader, *followers = [self.engine.new_request(ids, p, spans, rid, reuse, tenant)
                              for p, rid in zip(params, rids, strict=True)]
        leader.followers = followers
        return [self.engine.add(leader), *followers]

    def step(self) -> list[Request]:
        """One engine step; the requests it touched (see ``EngineCore.step``)."""
        return self.engine.step()

    def abort(self, req: Request) -> None:
        self.engine.abort(req)

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def error_of(self, req: Request) -> Exception | None:
        """The exception that failed ``req`` (``finish_reason == "error"``), if any; forgets it.

        ``generate``, ``chat``, ``stream`` and ``run_to_completion`` collect it; a caller driving
        ``add_tokenized`` + ``step`` itself should call this for each failed request."""
        return self.engine.error_of(req)

    def output_of(self, req: Request) -> RequestOutput:
        """The request's output so far (with the kept first-token data once it finished)."""
        return output_of(req)

    def run_to_completion(self, reqs: Sequence[Request]) -> list[RequestOutput]:
        """Step until ``reqs`` finish; their outputs in order. Re-raises the first request's error."""
        while not all(r.finished for r in reqs):
            self.step()
        errors = [e for e in (self.error_of(r) for r in reqs) if e is not None]
        if errors:
            raise errors[0]
        return [output_of(r) for r in reqs]

    # ----- generation ---------------------------------------------------------------------------

    def generate(
        self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | None = None,
        reuse: ReuseArg = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list of prompts; outputs keep the input order.

        ``reuse`` overrides the engine's reuse method/options for these requests."""
        batch: list[Prompt] = [prompts] if _is_single(prompts) else list(prompts)  # type: ignore[list-item, arg-type]
        reqs = [self.add_request(p, sampling_params, reuse=reuse) for p in batch]
        return self.run_to_completion(reqs)

    def chat(
        self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None,
        reuse: ReuseArg = None,
    ) -> RequestOutput:
        """One chat turn: the chat template renders ``messages``; every message is a segment."""
        ns = resolve_reuse(self.reuse, reuse, self.methods).namespace
        parts = self.tokenizer.chat_parts(messages, namespace=ns)
        ids, spans = self.tokenizer.encode_prompt(parts, source="chat")
        req = self.add_tokenized(ids, sampling_params or SamplingParams(), spans, reuse=reuse)
        return self.run_to_completion([req])[0]

    def stream(self, req: Request) -> Iterator[str]:
        """Drive the engine until ``req`` finishes, yielding its new text as it grows (the text that
        can no longer change: stop-string holdback and half-decoded characters wait)."""
        cursor = TextCursor(req.params.stop)
        while not req.finished:
            self.step()
            if delta := cursor.advance(req.text, finished=req.finished):
                yield delta
        if delta := cursor.advance(req.text, finished=True):
            yield delta
        if (error := self.error_of(req)) is not None:
            raise error

    def next_token_logprobs(self, prompt: Prompt, reuse: ReuseArg = None) -> np.ndarray:
        """Log-probabilities over the vocabulary of the token after ``prompt`` (1-D float32)."""
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        req = self.add_request(prompt, params, reuse=reuse, keep_first_logits=True)
        out = self.run_to_completion([req])[0]
        assert out.first_logprobs is not None
        return out.first_logprobs

    # ----- pinned segments (a knowledge base) ----------------------------------------------------

    def cache_segments(
        self, docs: Sequence[str | list[int]], namespace: str = "", names: Sequence[str] | None = None
    ) -> list[str]:
        """Precompute and pin documents; returns their segment ids. Pinned segments survive LRU
        eviction until the pool passes its high-water mark. Each document is a pin request
        (``add_pin``), prefilled in chunks like any other request."""
        reqs = [self.add_pin(d, namespace, names[i] if names else None) for i, d in enumerate(docs)]
        self.run_to_completion(reqs)
        return [str(r.pinned_segment_id) for r in reqs]

    def add_pin(self, doc: str | list[int], namespace: str = "", name: str | None = None,
                tenant: str = DEFAULT_TENANT) -> Request:
        """Queue the pinning of one document (computed alone, after BOS where the model uses one);
        its ``pinned_segment_id`` is set when it finishes. ``tenant``: who it is scheduled for."""
        # Control-token strings in a document are text (as in chat content), so the pinned tokens
        # match the same document wherever a request carries it.
        toks = self.tokenizer.encode(doc, special_tokens=False) if isinstance(doc, str) else [int(t) for t in doc]
        if not toks:
            raise ValueError("cannot pin an empty document")
        ids = self.tokenizer.with_bos(toks)
        if len(ids) > self.spec.max_position:
            raise ValueError(f"document of {len(ids)} tokens exceeds the context of {self.spec.max_position}")
        opts = ReuseOptions("none", MethodOptions(), CachePolicy(namespace, auto_segments=False, register=False))
        req = self.engine.new_request(ids, SamplingParams(max_tokens=1), reuse=opts, tenant=tenant)
        req.pin = PinSpec(namespace, name, len(toks))
        return self.engine.add(req)

    def uncache_segments(self, segment_ids: Sequence[str]) -> int:
        """Unpin segments (their KV stays cached until evicted); returns how many were found."""
        found = [sid for sid in segment_ids if self.engine.cache.segments.unpin(sid)]
        if self.engine.tiers is not None:
            self.engine.tiers.unpinned(found)
        return len(found)

    def list_segments(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Pinned segments with their size and hit counts."""
        return [
            {"id": p.segment_id, "name": p.name, "namespace": p.namespace, "num_tokens": p.num_tokens,
             "num_blocks": p.num_blocks, "num_hits": p.num_hits}
            for p in self.engine.cache.segments.list_pinned(namespace)
        ]

    # ----- the caches below the pool, and closing -------------------------------------------------

    def cache_entries(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Store entries this replica's pool holds (for placement by cache affinity); [] without tiers."""
        return self.engine.cache_entries(namespace)

    def cache_events(self, since: int = 0) -> list[dict[str, Any]]:
        """Store events after sequence number ``since`` (published, promoted, pinned, unpinned)."""
        return self.engine.cache_events(since)

    @property
    def kv_events(self) -> KVEventRecorder | None:
        """The KV-event recorder, or None."""
        return self.engine.kv_events

    def close(self) -> None:
        """Flush pending store writes and close the tiers and the KV-event socket; idempotent."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_single(prompts: object) -> bool:
    if isinstance(prompts, str):
        return True
    return isinstance(prompts, list) and bool(prompts) and all(isinstance(t, int) for t in prompts)
