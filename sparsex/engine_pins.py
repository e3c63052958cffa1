"""Pinned segments: ``LLM``'s knowledge-base API (a mixin of ``LLM``, sparsex/engine.py).

A pin is an ordinary request that computes KV only: ``add_pin`` queues it, the engine prefills it
in chunks like any other, and when its prompt is done ``Prefiller.pin_prefilled`` pins the
document's blocks and the request finishes with ``pinned_segment_id`` set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sparsex.engine_outputs import RequestOutput
from sparsex.kv_manager import KVCacheManager
from sparsex.models.base import ModelSpec
from sparsex.request import DEFAULT_TENANT, PinSpec, Request
from sparsex.reuse.options import ReuseOptions
from sparsex.reuse.tiers import TierCache
from sparsex.sampling_params import SamplingParams
from sparsex.tokenizer import Tokenizer


class PinnedSegments:
    """``LLM``'s pinned-segment API: ``cache_segments``, ``add_pin``, ``uncache_segments``,
    ``list_segments``."""

    # What it uses of the engine (set by ``LLM.__init__``).
    tokenizer: Tokenizer
    spec: ModelSpec
    cache: KVCacheManager
    tiers: TierCache | None

    if TYPE_CHECKING:  # the engine's request lifecycle (sparsex/engine.py, sparsex/engine_outputs.py)

        def add_tokenized(
            self, ids: list[int], params: SamplingParams, spans: Sequence[Any] = (), request_id: str | None = None,
            reuse: str | ReuseOptions | dict[str, Any] | None = None, keep_first_logits: bool | int = False,
            tenant: str = DEFAULT_TENANT,
        ) -> Request: ...

        def run_to_completion(self, reqs: Sequence[Request]) -> list[RequestOutput]: ...

    def cache_segments(
        self, docs: Sequence[str | list[int]], namespace: str = "", names: Sequence[str] | None = None
    ) -> list[str]:
        """Precompute and pin documents (a knowledge base); returns their segment ids.

        Pinned segments survive LRU eviction until the pool passes its high-water mark. Each
        document is a pin request (``add_pin``), prefilled in chunks like any other request.
        """
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
        opts = ReuseOptions(method="none", namespace=namespace, register=False, auto_segments=False)
        req = self.add_tokenized(ids, SamplingParams(max_tokens=1), reuse=opts, tenant=tenant)
        req.pin = PinSpec(namespace, name, len(toks))
        return req

    def uncache_segments(self, segment_ids: Sequence[str]) -> int:
        """Unpin segments (their KV stays cached until evicted); returns how many were found."""
        found = [sid for sid in segment_ids if self.cache.segments.unpin(sid)]
        if self.tiers is not None:
            self.tiers.unpinned(found)
        return len(found)

    def list_segments(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Pinned segments with their size and hit counts."""
        return [
            {"id": p.segment_id, "name": p.name, "namespace": p.namespace, "num_tokens": p.num_tokens,
             "num_blocks": p.num_blocks, "num_hits": p.num_hits}
            for p in self.cache.segments.list_pinned(namespace)
        ]
