"""A request's prefill with reuse: load the admitted hits, plan, run, publish.

    Admission (hits, blocks) ─▶ SegmentStore.load ─▶ plan_prefill ─▶ run_plan ─▶ SegmentStore.publish
                                  copy + realign      RecomputePlan    PlanRun      fresh KV only

``Prefiller`` is given its dependencies (the segment store, the model runner, the planners) and
returns a ``PrefillResult``; it never reaches back into the engine.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from sparsex.kv_manager import Admission
from sparsex.model_runner import ModelRunner, SeqInput
from sparsex.models.base import ModelSpec
from sparsex.reuse.executor import compute_fraction, run_plan
from sparsex.reuse.options import ReuseOptions
from sparsex.reuse.planner import PLANNERS, PlanContext, Planner, ReuseSituation, plan_prefill
from sparsex.reuse.store import SegmentStore
from sparsex.segments import SegmentSpan


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
    """Runs prefills over one model's KV: built-in methods plus any ``planners`` given (the lab's)."""

    def __init__(
        self, store: SegmentStore, runner: ModelRunner, spec: ModelSpec,
        planners: Mapping[str, Planner] | None = None,
    ) -> None:
        self.store = store
        self.runner = runner
        self.spec = spec
        self.planners: dict[str, Planner] = {**PLANNERS, **(planners or {})}
        self.context = PlanContext(spec, store.kv, runner)

    def prefill(self, ids: list[int], opts: ReuseOptions, adm: Admission) -> PrefillResult:
        """Run ``ids`` with ``opts`` over the blocks and hits of ``adm``."""
        t0 = time.perf_counter()
        n, start, table = len(ids), adm.prefix_len, list(adm.block_table)
        runs = [(h.span.start, h.span.start + h.num_tokens) for h in adm.hits]
        hit_sources: Counter[str] = Counter()
        for h in adm.hits:
            hit_sources[h.span.source] += h.num_tokens
        reused = torch.zeros(n, dtype=torch.bool)
        try:
            reused[self.store.load(adm.hits, table)] = True
        except Exception:
            self.store.manager.release_hits(adm.hits)  # load releases them only when it completes
            raise
        load_s = time.perf_counter() - t0
        seq = SeqInput(ids[start:], list(range(start, n)), table, n)
        plan = plan_prefill(opts, ReuseSituation(seq, start, reused, runs), self.context, self.planners)
        run = run_plan(self.runner, plan)
        if opts.register:
            first_reused = min((a for a, _ in runs), default=n)
            fresh = [
                s for s in adm.spans
                if not bool(reused[s.start : s.end].any()) and (s.end <= first_reused or opts.register_after_reuse)
            ]
            self.store.publish(ids, table, opts.namespace, first_reused, fresh)
        return PrefillResult(
            logits=run.logits, recomputed=run.recomputed, num_prefix_hit_tokens=start,
            num_segment_hit_tokens=int(reused.sum()),
            compute_fraction=compute_fraction(plan, run, self.spec.num_layers, n), load_s=load_s,
            segment_sources=dict(Counter(str(s.source) for s in adm.spans)),
            hit_tokens_by_source=dict(hit_sources),
        )

    def pin(self, ids: list[int], num_doc_tokens: int, namespace: str, name: str | None) -> str:
        """Compute ``ids`` (a document's last ``num_doc_tokens`` tokens after BOS) and pin the document."""
        pool = self.store.pool
        blocks = pool.allocate(-(-len(ids) // pool.block_size))
        try:
            self.runner.forward([SeqInput(ids, list(range(len(ids))), blocks, len(ids))])
            span = SegmentSpan(len(ids) - num_doc_tokens, len(ids), "pinned", namespace)
            sids = self.store.publish(ids, blocks, namespace, len(ids), [span], pinned=True, name=name)
        finally:
            pool.release(blocks)
        if not sids:
            raise RuntimeError("the KV pool is full; could not pin the document")
        return sids[0]
