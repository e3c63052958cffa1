"""The oracle reuse methods (analysis only): recompute the reused tokens whose cached KV is most
wrong, measured with a full prefill. They show the headroom of any selector and cost a full prefill,
so they live in the lab and the server never offers them. Give them to an engine with
``LLM(planners=LAB_PLANNERS)``.

Two, named so that no table compares unlike things:
- ``oracle``: selection only (no dense layer, overflow, tail or shift): ``I_nr`` + top-k by true
  error. Compare it with other *selectors*.
- ``oracle-blend``: the default's whole pipeline with the true-error top-k as its final set: layer
  0 dense, no probe (the oracle needs none), overflow after each new-text run, tail, and the segment
  shift from layer 1. Compare it with ``blend``: the gap is what a better selector could still gain.
The measuring prefill is not counted in either's cost.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsex.reuse.options import BlendOptions, BudgetOptions
from sparsex.reuse.planner import (
    Method,
    PlanContext,
    ReuseSituation,
    budget_tokens,
    recompute_extras,
    shift_hook,
)
from sparsex.reuse.selectors import top_k_reused, union
from sparsex.runtime.executor import RecomputePlan
from sparsex.runtime.model_runner import SeqInput


def true_kv_error(ctx: PlanContext, seq: SeqInput, reused: torch.Tensor) -> torch.Tensor:
    """[T] per-token L2 error of the loaded KV against a full prefill, summed over layers and K/V.

    Runs the full prefill (overwriting the request's KV), measures, then puts the loaded KV back.
    """
    kv = ctx.kv
    pos = torch.nonzero(reused).flatten()
    slots = kv.slots(seq.block_table, pos.to(kv.k.device))
    k_loaded, v_loaded = kv.k[:, slots].clone(), kv.v[:, slots].clone()  # [L, R, Hkv, D]
    ctx.runner.forward([seq])
    err = (kv.k[:, slots].float() - k_loaded.float()).pow(2).sum(dim=(2, 3)).sqrt().sum(0)
    err += (kv.v[:, slots].float() - v_loaded.float()).pow(2).sum(dim=(2, 3)).sqrt().sum(0)
    kv.k[:, slots], kv.v[:, slots] = k_loaded, v_loaded
    out = torch.zeros(reused.numel())
    out[pos] = err.cpu()
    return out


def _oracle_top_k(opts: BudgetOptions, sit: ReuseSituation, ctx: PlanContext) -> torch.Tensor:
    error = true_kv_error(ctx, sit.seq, sit.reused)
    return top_k_reused(error, sit.reused, budget_tokens(opts, sit, ctx))


def plan_oracle(opts: BudgetOptions, sit: ReuseSituation, ctx: PlanContext) -> RecomputePlan:
    """Selection only: no dense layer, no overflow, no shift; ``I_nr`` plus the top ``budget`` of the
    reused tokens by their true KV error."""
    return RecomputePlan(sit.seq, 0, union(sit.i_nr, _oracle_top_k(opts, sit, ctx)))


def plan_oracle_blend(opts: BlendOptions, sit: ReuseSituation, ctx: PlanContext) -> RecomputePlan:
    """``blend``'s pipeline with the true-error top-k as the final set: layer 0 dense, then
    ``I_nr`` + top-k + overflow + tail for every later layer, with the segment shift from layer 1."""
    extras = recompute_extras(opts, sit, ctx)
    chosen = union(sit.i_nr, _oracle_top_k(opts, sit, ctx), extras)
    return RecomputePlan(sit.seq, 1, chosen, adjust=shift_hook(opts, sit, ctx, extras), adjust_from=1)


LAB_PLANNERS: dict[str, Method[Any]] = {
    "oracle": Method(BudgetOptions, plan_oracle), "oracle-blend": Method(BlendOptions, plan_oracle_blend)}
"""The lab's analysis-only reuse methods, for ``LLM(planners=...)``."""
