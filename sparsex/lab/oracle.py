"""The ``oracle`` reuse method (analysis only): recompute the reused tokens whose cached KV is most
wrong, measured with a full prefill. It shows the headroom of any selector and costs a full prefill,
so it lives in the lab and the server never offers it. Give it to an engine with
``LLM(planners=LAB_PLANNERS)``.
"""

from __future__ import annotations

import torch

from sparsex.model_runner import SeqInput
from sparsex.reuse.executor import RecomputePlan
from sparsex.reuse.options import ReuseOptions
from sparsex.reuse.planner import PlanContext, ReuseSituation
from sparsex.reuse.selectors import top_k_reused, union


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


def plan_oracle(opts: ReuseOptions, sit: ReuseSituation, ctx: PlanContext) -> RecomputePlan:
    """Selection only: no dense layer, no overflow, no shift; ``I_nr`` plus the top ``budget`` of the
    reused tokens by their true KV error."""
    error = true_kv_error(ctx, sit.seq, sit.reused)
    k = int(round(opts.budget * sit.num_reused))
    return RecomputePlan(sit.seq, 0, union(sit.i_nr, top_k_reused(error, sit.reused, k)))


LAB_PLANNERS = {"oracle": plan_oracle}
"""The lab's analysis-only reuse methods, for ``LLM(planners=...)``."""
