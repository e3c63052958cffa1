"""Turn a request's reuse situation and a method into a ``RecomputePlan`` (immutable data).

One small function per method; the scores they rank by are pure functions in
``sparsex.reuse.selectors``. The plan is run by ``sparsex.runtime.executor.run_plan``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Generic, TypeVar

import torch

from sparsex.kv.paged import KVCache
from sparsex.models.base import ModelSpec
from sparsex.reuse.options import (
    BlendOptions,
    BudgetOptions,
    CacheBlendOptions,
    CheckOptions,
    EpicOptions,
    MethodOptions,
    RepairOptions,
    ReuseOptions,
    SparsexOptions,
    boundary_layer,
    budget_fraction,
    narrow_layer,
    shift_weight,
)
from sparsex.reuse.selectors import (
    deviation_scores,
    epic_positions,
    filter_schedule,
    kv_deviation_scores,
    overflow_positions,
    query_mass,
    sink_positions,
    tail_positions,
    top_k_reused,
    union,
)
from sparsex.reuse.shift import segment_shift
from sparsex.runtime.executor import KVAdjust, NarrowStage, RecomputePlan, SelectionInputs, Selector
from sparsex.runtime.model_runner import ModelRunner, SeqInput


@dataclass(frozen=True)
class ReuseSituation:
    """What the request holds before its forward pass.

    seq: the tokens to run (positions prefix_len..T-1) and the request's block table.
    prefix_len: exact prefix-cache hit length.
    reused: [T] bool, positions whose KV was loaded from cached segments.
    segment_runs: [start, end) of every loaded segment hit.
    cached_at: [T] int64, the position each reused token's KV was computed at (-1 where not reused).
    """

    seq: SeqInput
    prefix_len: int
    reused: torch.Tensor
    segment_runs: list[tuple[int, int]]
    cached_at: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.reused.numel())

    @cached_property
    def fresh(self) -> torch.Tensor:
        """[T] bool: the non-reused positions after the prefix, and always the last one."""
        fresh = ~self.reused
        fresh[: self.prefix_len] = False
        fresh[self.length - 1] = True
        return fresh

    @cached_property
    def i_nr(self) -> torch.Tensor:
        """Non-reused positions (always recomputed), ascending."""
        return torch.nonzero(self.fresh).flatten()

    @property
    def num_reused(self) -> int:
        return int(self.reused.sum())


@dataclass(frozen=True)
class PlanContext:
    """What a planner may use besides the options and the situation: the model and its KV.

    A built-in planner only reads ``spec`` and ``kv``; an evaluation planner (the lab's oracle) may
    also run the model through ``runner``.
    """

    spec: ModelSpec
    kv: KVCache
    runner: ModelRunner


P = TypeVar("P", bound=MethodOptions)


@dataclass(frozen=True)
class Method(Generic[P]):
    """A reuse method: its option type and its planner, a pure function of those options, the
    request's situation and the model's context."""

    options: type[P]
    plan: Callable[[P, ReuseSituation, PlanContext], RecomputePlan]


def plan_prefill(
    opts: ReuseOptions, sit: ReuseSituation, ctx: PlanContext, methods: Mapping[str, Method[Any]] | None = None
) -> RecomputePlan:
    """The plan of ``opts.method`` from ``methods`` (default: the built-in ``PLANNERS``).

    ``none``, ``prefix`` and any request that reused nothing recompute everything after the prefix.
    """
    if opts.method in ("none", "prefix") or sit.num_reused == 0:
        return RecomputePlan(sit.seq, ctx.spec.num_layers, torch.arange(sit.prefix_len, sit.length))
    method = (PLANNERS if methods is None else methods)[opts.method]
    if not isinstance(opts.params, method.options):
        raise TypeError(f"{opts.method} takes {method.options.__name__}, got {type(opts.params).__name__}")
    return method.plan(opts.params, sit, ctx)


def budget_tokens(opts: BudgetOptions, sit: ReuseSituation, ctx: PlanContext) -> int:
    """The top-k size: the family's (or the request's) budget times the reused tokens."""
    return int(round(budget_fraction(opts, ctx.spec.family) * sit.num_reused))


def plan_naive(opts: MethodOptions, sit: ReuseSituation, ctx: PlanContext) -> RecomputePlan:
    return RecomputePlan(sit.seq, dense_layers=0, recompute=sit.i_nr)


def plan_epic(opts: EpicOptions, sit: ReuseSituation, ctx: PlanContext) -> RecomputePlan:
    return RecomputePlan(sit.seq, 0, union(sit.i_nr, epic_positions(sit.segment_runs, opts.epic_tokens)))


def plan_cacheblend_simple(opts: CheckOptions, sit: ReuseSituation, ctx: PlanContext) -> RecomputePlan:
    """Simplified CacheBlend: dense through the check layer, then the top reused tokens by K
    deviation there, in one step (no gradual filtering)."""
    check, k = min(opts.check_layer, ctx.spec.num_layers - 1), budget_tokens(opts, sit, ctx)

    def select(inp: SelectionInputs) -> torch.Tensor:
        return union(sit.i_nr, top_k_reused(kv_deviation_scores(inp.k_fresh, inp.k_cached), sit.reused, k))

    return RecomputePlan(sit.seq, check + 1, sit.i_nr, select, check)


def plan_cacheblend(opts: CacheBlendOptions, sit: ReuseSituation, ctx: PlanContext) -> RecomputePlan:
    """CacheBlend as published: gradual filtering. Dense through the check layer, where the top
    ``filter_start`` x budget reused tokens by K deviation are kept; each of the next
    ``filter_layers`` layers runs for the kept set and keeps the top of *that* set by its own K
    deviation, shrinking linearly to the budget. Their fresh KV stays written (no restore)."""
    layers, k = ctx.spec.num_layers, budget_tokens(opts, sit, ctx)
    check = min(opts.check_layer, layers - 1)
    steps = max(0, min(opts.filter_layers, layers - 2 - check))  # the final set runs at least one layer
    sizes = filter_schedule(k, sit.num_reused, opts.filter_start, steps)

    def top(size: int, among: torch.Tensor) -> Selector:
        def select(inp: SelectionInputs) -> torch.Tensor:
            pool = among.clone()
            if inp.layer > check:  # a later stage ranks only the tokens that ran this layer
                pool = torch.zeros_like(among)
                pool[inp.positions.cpu()] = True
                pool &= among
            scores = kv_deviation_scores(inp.k_fresh, inp.k_cached).cpu()
            return union(sit.i_nr, top_k_reused(scores, pool, size))

        return select

    stages = tuple(NarrowStage(check + j, top(size, sit.reused)) for j, size in enumerate(sizes[1:], start=1))
    return RecomputePlan(sit.seq, check + 1, sit.i_nr, top(sizes[0], sit.reused), check, stages=stages)


def recompute_extras(opts: RepairOptions, sit: ReuseSituation, ctx: PlanContext) -> torch.Tensor:
    """Overflow blocks next to every non-reused run, the tail fallback, and the cached attention
    sinks when asked (sparsex, blend). Overflow before new text too: sparsex's default."""
    before = isinstance(opts, SparsexOptions) if opts.overflow_before is None else opts.overflow_before
    width = opts.overflow_blocks * ctx.kv.block_size
    return union(
        overflow_positions(sit.reused, width, sit.prefix_len, before=before),
        tail_positions(sit.reused, sit.segment_runs, opts.tail_tokens),
        sink_positions(sit.reused, sit.cached_at, opts.sink_tokens),
    )


def _query_mass(sit: ReuseSituation, ctx: PlanContext, inp: SelectionInputs) -> torch.Tensor:
    spec = ctx.spec
    return query_mass(inp.q, inp.k_fresh, inp.positions, sit.fresh, scale=spec.attn_scale,
                      window=spec.windows[inp.layer])


def plan_sparsex(opts: SparsexOptions, sit: ReuseSituation, ctx: PlanContext) -> RecomputePlan:
    """The paper's method: Sparse-Q at ℓ* (hybrid: layers 0..ℓ* dense) or at layer 0."""
    extras, k = recompute_extras(opts, sit, ctx), budget_tokens(opts, sit, ctx)

    def select(inp: SelectionInputs) -> torch.Tensor:
        return union(sit.i_nr, top_k_reused(_query_mass(sit, ctx, inp), sit.reused, k), extras)

    if opts.hybrid:
        lstar = boundary_layer(opts, ctx.spec.num_layers, ctx.spec.family)
        return RecomputePlan(sit.seq, lstar + 1, sit.i_nr, select, lstar)
    return RecomputePlan(sit.seq, 0, sit.i_nr, select, 0)


def shift_hook(opts: BlendOptions, sit: ReuseSituation, ctx: PlanContext, extras: torch.Tensor) -> KVAdjust | None:
    """The segment shift with the family's (or the request's) weights and shrinkage; None when off.
    ``extras``: the plan's :func:`recompute_extras` (left out of the means with ``shift_sources="selected"``)."""
    weight = shift_weight(opts, ctx.spec.family)
    if weight <= 0 and not opts.shift_v:
        return None
    not_sources = extras if opts.shift_sources == "selected" else None
    return segment_shift(ctx.kv, ctx.spec, sit.seq.block_table, sit.reused, sit.segment_runs, weight,
                         opts.shift_v, opts.shift_shrink, not_sources)


def plan_blend(opts: BlendOptions, sit: ReuseSituation, ctx: PlanContext) -> RecomputePlan:
    """Ours: layer 0 dense, a probe of the check layer picks candidates by K+V deviation; they run to
    ``narrow_layer``, where K+V deviation plus Sparse-Q keeps the budget; then the segment shift."""
    layers, n = ctx.spec.num_layers, sit.length
    check = max(1, min(opts.check_layer, layers - 1))
    narrow_at = min(narrow_layer(opts, ctx.spec.family), layers - 1)
    narrow = narrow_at > check
    extras, k = recompute_extras(opts, sit, ctx), budget_tokens(opts, sit, ctx)
    first_k = min(sit.num_reused, int(round(opts.candidates * k))) if narrow else k

    def select(inp: SelectionInputs) -> torch.Tensor:
        among = sit.reused.to(inp.k_fresh.device)
        scores = deviation_scores(inp.k_fresh, inp.k_cached, inp.v_fresh, inp.v_cached, among)
        return union(sit.i_nr, top_k_reused(scores, sit.reused, first_k), extras)

    def narrow_select(inp: SelectionInputs) -> torch.Tensor:
        dev = inp.k_fresh.device
        pool = torch.zeros(n, dtype=torch.bool, device=dev)
        pool[inp.positions] = True
        pool &= sit.reused.to(dev)
        pool[extras.to(dev)] = False  # the overflow and tail stay selected
        scores = deviation_scores(inp.k_fresh, inp.k_cached, inp.v_fresh, inp.v_cached, pool,
                                  _query_mass(sit, ctx, inp))
        return union(sit.i_nr, top_k_reused(scores, pool, k), extras)

    adjust = shift_hook(opts, sit, ctx, extras)
    return RecomputePlan(
        sit.seq, check, sit.i_nr, select, check, probe=True, restore=torch.nonzero(sit.reused).flatten(),
        stages=(NarrowStage(narrow_at, narrow_select),) if narrow else (),
        adjust=adjust, adjust_from=narrow_at + 1 if narrow else check,  # once the recompute set is final
    )


PLANNERS: dict[str, Method[Any]] = {
    "none": Method(MethodOptions, plan_naive),  # never called: plan_prefill recomputes everything
    "prefix": Method(MethodOptions, plan_naive),  # likewise, after the exact prefix
    "naive": Method(MethodOptions, plan_naive),
    "epic": Method(EpicOptions, plan_epic),
    "cacheblend": Method(CacheBlendOptions, plan_cacheblend),
    "cacheblend-simple": Method(CheckOptions, plan_cacheblend_simple),
    "sparsex": Method(SparsexOptions, plan_sparsex),
    "blend": Method(BlendOptions, plan_blend),
}
"""The built-in reuse methods: each one's option type (as ``METHOD_OPTIONS`` lists) and planner."""
