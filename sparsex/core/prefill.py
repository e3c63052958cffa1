"""A request's prefill with reuse: load the admitted hits, plan, run, publish.

    Admission (hits, blocks) ─▶ SegmentStore.load ─▶ plan_prefill ─▶ PlanExecution ─▶ SegmentStore.publish
                                  copy + realign      RecomputePlan    PlanRun      fresh KV only

``Prefiller`` is given its dependencies (the segment store, the model runner, the methods) and
returns a ``PrefillResult``; it never reaches back into the engine.

Every prefill is *chunked*, so the engine can interleave other requests' steps between calls of
``PrefillTask.advance``: one that recomputes everything after the exact prefix (``none``, ``prefix``,
or a prompt that reused nothing) runs at most a given number of tokens through every layer per call
(vLLM's chunked prefill); a sparse plan (reuse) runs its next layers, as many as about the same
number of token-layers allows (``PlanExecution``).

    prompt   [ exact prefix | chunk 1 | chunk 2 | ... | chunk k ]   each chunk: all layers,
                              advance   advance         advance     attending over the KV before it
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from sparsex.core.request import PinSpec
from sparsex.kv.admission import Admission, fresh_pieces
from sparsex.kv.prompt_ends import PromptEnds
from sparsex.kv.segment_store import SegmentStore
from sparsex.models.base import ModelSpec
from sparsex.reuse.options import ReuseOptions
from sparsex.reuse.planner import Method, PlanContext, ReuseSituation, plan_prefill
from sparsex.runtime.executor import PlanExecution, PlanRun, RecomputePlan, compute_fraction
from sparsex.runtime.model_runner import ModelRunner, SeqInput
from sparsex.segments import SegmentSpan

MIN_REUSED_SHARE = 0.05
"""Reuse only when the hits cover at least this share of the tokens after the exact prefix: below
it, a repair plan's fixed parts (a dense layer, a probe) cost more than the few tokens it saves,
and a full recompute of the rest is exact (and runs in token chunks)."""


@dataclass(frozen=True)
class PrefillResult:
    """What a prefill computed.

    logits: [V] float32 logits of the last prompt position.
    recomputed: positions that ran the last layer, ascending.
    num_prefix_hit_tokens / num_segment_hit_tokens: tokens served by the prefix cache / segments.
    compute_fraction: share of a full prefill's token-layers that ran.
    load_s: seconds spent loading and aligning segment KV.
    segment_sources: segments per source; hit_tokens_by_source: reused tokens per source.
    """

    logits: torch.Tensor
    recomputed: torch.Tensor
    num_prefix_hit_tokens: int
    num_segment_hit_tokens: int
    compute_fraction: float
    load_s: float
    segment_sources: dict[str, int] = field(default_factory=dict)
    hit_tokens_by_source: dict[str, int] = field(default_factory=dict)


class Prefiller:
    """Runs prefills over one model's KV with the reuse ``methods`` it is given (the engine's
    registry: the built-in planners plus any added ones)."""

    def __init__(
        self, store: SegmentStore, runner: ModelRunner, spec: ModelSpec, methods: Mapping[str, Method[Any]],
    ) -> None:
        self.store = store
        self.runner = runner
        self.spec = spec
        self.methods = methods
        self.context = PlanContext(spec, store.kv, runner)
        self.ends = PromptEnds(store.kv, store.pool)

    def start(self, ids: list[int], opts: ReuseOptions, adm: Admission) -> PrefillTask | RecalledPrefill:
        """Load ``adm``'s hits and plan; the returned task runs the plan (``advance``). Hits that
        cover less than ``MIN_REUSED_SHARE`` of the tokens after the exact prefix are handed back
        unused: a sparse plan around them would cost more than recomputing them. An exact repeat
        (every full block a prefix hit, its end kept by ``PromptEnds``) runs nothing."""
        n_reused = sum(b - a for a, b in adm.runs)
        if adm.hits and n_reused < MIN_REUSED_SHARE * (len(ids) - adm.prefix_len):
            self.store.manager.release_hits(adm.hits)
            adm = replace(adm, hits=())
        if opts.uses_prefix and not adm.hits and adm.prefix_len == (len(ids) - 1) // self.store.pool.block_size * self.store.pool.block_size:
            logits = self.ends.recall(ids, adm.block_table, opts.namespace)
            if logits is not None:
                return RecalledPrefill(ids, adm, logits)
        return PrefillTask(self, ids, opts, adm)

    def _load_and_plan(self, ids: list[int], opts: ReuseOptions, adm: Admission) -> tuple[RecomputePlan, torch.Tensor, float]:
        t0 = time.perf_counter()
        n, start, table = len(ids), adm.prefix_len, list(adm.block_table)
        reused = torch.zeros(n, dtype=torch.bool)
        cached_at = torch.full((n,), -1, dtype=torch.int64)
        try:
            to_pos, from_pos = self.store.load(adm.hits, table)
        except Exception:
            self.store.manager.release_hits(adm.hits)  # load releases them only when it completes
            raise
        reused[to_pos] = True
        cached_at[to_pos] = from_pos
        load_s = time.perf_counter() - t0
        seq = SeqInput(ids[start:], list(range(start, n)), table, n)
        situation = ReuseSituation(seq, start, reused, adm.runs, cached_at)
        plan = plan_prefill(opts, situation, self.context, self.methods)
        return plan, reused, load_s

    def _finish(
        self, ids: list[int], opts: ReuseOptions, adm: Admission, plan: RecomputePlan, run: PlanRun,
        reused: torch.Tensor, load_s: float,
    ) -> PrefillResult:
        """Publish fresh KV and describe what ran."""
        n, start, table = len(ids), adm.prefix_len, list(adm.block_table)
        hit_sources: Counter[str] = Counter()
        for h in adm.hits:
            hit_sources[h.span.source] += h.num_tokens
        if opts.cache.register:
            first_reused = min((a for a, _ in adm.runs), default=n)
            fresh = [s for s in fresh_pieces(adm.spans, adm.runs)
                     if s.end <= first_reused or opts.cache.register_after_reuse]
            self.store.publish(ids, table, opts.namespace, first_reused, fresh)
            if not adm.hits and plan.dense_layers == self.spec.num_layers and plan.adjust is None:
                self.ends.remember(ids, table, opts.namespace, run.logits)  # computed exactly
        return PrefillResult(
            logits=run.logits, recomputed=run.recomputed, num_prefix_hit_tokens=start,
            num_segment_hit_tokens=int(reused.sum()),
            compute_fraction=compute_fraction(plan, run, self.spec.num_layers, n), load_s=load_s,
            segment_sources=dict(Counter(str(s.source) for s in adm.spans)),
            hit_tokens_by_source=dict(hit_sources),
        )

    def pin_prefilled(self, ids: list[int], block_table: list[int], pin: PinSpec) -> str:
        """Pin the document a pin request just computed (its prompt: BOS + the document)."""
        span = SegmentSpan(len(ids) - pin.num_doc_tokens, len(ids), "pinned", pin.namespace)
        sids = self.store.publish(ids, block_table, pin.namespace, len(ids), [span], pinned=True, name=pin.name)
        if not sids:
            raise RuntimeError("the KV pool is full; could not pin the document")
        return sids[0]


class RecalledPrefill:
    """An exact repeat served from ``PromptEnds``: its KV is complete and its logits known; the
    same interface as :class:`PrefillTask`, done at once."""

    def __init__(self, ids: list[int], adm: Admission, logits: torch.Tensor) -> None:
        self.ids, self.adm, self.done = ids, adm, len(ids)
        self.result = PrefillResult(
            logits=logits, recomputed=torch.zeros(0, dtype=torch.int64), num_prefix_hit_tokens=adm.prefix_len,
            num_segment_hit_tokens=0, compute_fraction=0.0, load_s=0.0,
            segment_sources=dict(Counter(str(s.source) for s in adm.spans)),
        )

    @property
    def num_remaining(self) -> int:
        return 0

    def advance(self, max_tokens: int | None) -> PrefillResult:
        return self.result


class PrefillTask:
    """One request's prefill in progress: hits loaded, plan made; ``advance`` runs it.

    A full recompute runs in token chunks (every layer for the next tokens); a sparse plan runs in
    layer chunks (``PlanExecution``) of about the same work. Invariant: ``done`` prompt positions
    have their KV in every layer (starting at the exact prefix; a sparse plan completes all at once).
    """

    def __init__(self, prefiller: Prefiller, ids: list[int], opts: ReuseOptions, adm: Admission) -> None:
        self.prefiller, self.ids, self.opts, self.adm = prefiller, ids, opts, adm
        self.plan, self.reused, self.load_s = prefiller._load_and_plan(ids, opts, adm)
        self.done = adm.prefix_len
        p, layers = self.plan, prefiller.spec.num_layers
        # A full recompute (every layer dense, nothing to select) can run in token chunks.
        self.chunkable = p.dense_layers == layers and p.select is None and p.adjust is None
        self.execution = None if self.chunkable else PlanExecution(prefiller.runner, p)

    @property
    def num_remaining(self) -> int:
        """Prompt tokens left to prefill (a sparse plan: its remaining work in full-prefill tokens)."""
        if self.execution is not None:
            return -(-int(self.execution.remaining_work) // self.prefiller.spec.num_layers)
        return len(self.ids) - self.done

    def advance(self, max_tokens: int | None) -> PrefillResult | None:
        """Run about ``max_tokens`` more prompt tokens' worth of work (None: all of it): the next
        tokens through every layer, or a sparse plan's next layers for as many token-layers.
        Returns the result once the prompt is done, else None."""
        n = len(self.ids)
        if self.execution is not None:
            budget = None if max_tokens is None else float(max_tokens * self.prefiller.spec.num_layers)
            run = self.execution.advance(budget)
            if run is None:
                return None
        elif max_tokens is None or self.num_remaining <= max_tokens:
            run = PlanRun(self._chunk(n), torch.arange(self.adm.prefix_len, n))
        else:
            self._chunk(self.done + max_tokens)
            return None
        self.done = n
        return self.prefiller._finish(self.ids, self.opts, self.adm, self.plan, run, self.reused, self.load_s)

    def _chunk(self, end: int) -> torch.Tensor:
        """Positions ``done..end-1`` through every layer; logits [V] of position ``end - 1``."""
        a, table = self.done, list(self.adm.block_table)
        logits = self.prefiller.runner.forward([SeqInput(self.ids[a:end], list(range(a, end)), table, end)])[0]
        self.done = end
        return logits
