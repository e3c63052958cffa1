"""Turn a request's reuse situation and a method into a planned prefill.

The planner decides which layers run densely and which tokens the remaining layers
recompute; the selectors it calls are pure functions (sparsex.reuse.selectors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsex.attention import attention_probs
from sparsex.kv_cache import KVCache
from sparsex.model_runner import PlannedPrefill, SeqInput
from sparsex.models.base import ModelSpec, StepContext
from sparsex.reuse.options import ReuseOptions, boundary_layer
from sparsex.reuse.selectors import (
    epic_positions,
    kv_deviation_scores,
    overflow_positions,
    sparse_q_scores,
    tail_positions,
    top_k_reused,
    union,
)

QUERY_CHUNK = 256  # non-reused queries scored at a time (bounds the [H, N, T] probability tensor)


@dataclass
class ReuseSituation:
    """What the request holds before its forward pass.

    seq: the tokens to run (positions prefix_len..T-1) and the request's block table.
    prefix_len: exact prefix-cache hit length.
    reused: [T] bool, positions whose KV was loaded from cached segments.
    segment_runs: [start, end) of every loaded segment hit.
    """

    seq: SeqInput
    prefix_len: int
    reused: torch.Tensor
    segment_runs: list[tuple[int, int]]


def plan_prefill(
    opts: ReuseOptions, spec: ModelSpec, kv: KVCache, sit: ReuseSituation
) -> PlannedPrefill:
    n, start = sit.reused.numel(), sit.prefix_len
    layers = spec.num_layers
    fresh = ~sit.reused
    fresh[:start] = False
    fresh[n - 1] = True
    i_nr = torch.nonzero(fresh).flatten()  # non-reused positions (always recomputed)
    num_reused = int(sit.reused.sum())
    k = int(round(opts.budget * num_reused))
    method = opts.method
    if method in ("none", "prefix") or num_reused == 0:
        return PlannedPrefill(sit.seq, dense_layers=layers, recompute=torch.arange(start, n))
    if method == "naive":
        return PlannedPrefill(sit.seq, dense_layers=0, recompute=i_nr)
    if method == "epic":
        return PlannedPrefill(sit.seq, 0, union(i_nr, epic_positions(sit.segment_runs, opts.epic_tokens)))
    width = opts.overflow_blocks * kv.block_size
    extras = union(
        overflow_positions(sit.reused, width, start),
        tail_positions(sit.reused, sit.segment_runs, opts.tail_tokens),
    )
    read = sit.seq

    def k_after(step: StepContext, layer: int) -> torch.Tensor:
        return kv.read(layer, step.seqs[0].read)[0]  # [T, Hkv, D]

    if method == "cacheblend":
        check = min(opts.check_layer, layers - 1)

        def select_dev(step: StepContext, layer: int) -> torch.Tensor:
            _, k_before = step.captured[layer][0]
            scores = kv_deviation_scores(k_after(step, layer), k_before)
            return union(i_nr, top_k_reused(scores, sit.reused, k))

        return PlannedPrefill(read, check + 1, i_nr, select_dev, check)

    if method == "blend":
        # Overflow and tail first, inside the budget; the rest by K deviation at the check layer.
        check = min(opts.check_layer, layers - 1)
        extras_in = extras[: max(0, k)] if extras.numel() > k else extras
        remaining = sit.reused.clone()
        remaining[extras_in] = False

        def select_blend(step: StepContext, layer: int) -> torch.Tensor:
            _, k_before = step.captured[layer][0]
            scores = kv_deviation_scores(k_after(step, layer), k_before)
            chosen = top_k_reused(scores, remaining, k - extras_in.numel())
            return union(i_nr, extras_in, chosen)

        return PlannedPrefill(read, check + 1, i_nr, select_blend, check)

    # sparsex: Sparse-Q scores at ℓ* (hybrid) or at layer 0 from the non-reused queries alone.
    lstar = boundary_layer(opts, layers, spec.family) if opts.hybrid else 0

    def select_q(step: StepContext, layer: int) -> torch.Tensor:
        q, _ = step.captured[layer][0]
        active = step.seqs[0].positions
        rows = torch.nonzero(fresh[active.cpu()]).flatten()
        keys = k_after(step, layer)
        scores = torch.zeros(n)
        for c in range(0, rows.numel(), QUERY_CHUNK):
            r = rows[c : c + QUERY_CHUNK]
            probs = attention_probs(
                q[r], keys, active[r], scale=spec.attn_scale, window=spec.windows[layer]
            )  # [H, n_r, T]
            scores += sparse_q_scores(probs, active[r], n).cpu()
        return union(i_nr, top_k_reused(scores, sit.reused, k), extras)

    if opts.hybrid:
        return PlannedPrefill(read, lstar + 1, i_nr, select_q, lstar)
    return PlannedPrefill(read, 0, i_nr, select_q, 0)


def compute_fraction(plan: PlannedPrefill, num_layers: int, prompt_len: int, recomputed: int) -> float:
    """Fraction of a full prefill's per-layer token work actually done (a dense layer counts in full)."""
    run = len(plan.seq.token_ids)
    work = plan.dense_layers * run + (num_layers - plan.dense_layers) * recomputed
    if plan.dense_layers == 0 and plan.select is not None:
        work += plan.recompute.numel() * (plan.select_layer + 1)  # the probe
    return work / (num_layers * prompt_len)
