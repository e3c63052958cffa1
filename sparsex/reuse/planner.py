"""Turn a request's reuse situation and a method into a planned prefill.

The planner decides which layers run densely and which tokens the remaining layers
recompute; the selectors it calls are pure functions (sparsex.reuse.selectors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsex.attention import attention_probs
from sparsex.kv_cache import KVCache
from sparsex.model_runner import PlannedPrefill, SelectionInputs, SeqInput
from sparsex.models.base import ModelSpec
from sparsex.reuse.options import ReuseOptions, boundary_layer, shift_weight
from sparsex.reuse.selectors import (
    epic_positions,
    kv_deviation_scores,
    overflow_positions,
    segment_start_prior,
    sparse_q_scores,
    tail_positions,
    top_k_reused,
    top_segments,
    union,
)
from sparsex.reuse.shift import segment_shift

QUERY_CHUNK = 256  # non-reused queries scored at a time (bounds the [H, N, T] probability tensor)


@dataclass
class ReuseSituation:
    """What the request holds before its forward pass.

    seq: the tokens to run (positions prefix_len..T-1) and the request's block table.
    prefix_len: exact prefix-cache hit length.
    reused: [T] bool, positions whose KV was loaded from cached segments.
    segment_runs: [start, end) of every loaded segment hit.
    true_error: [T] float, method ``oracle`` only: each token's cached-vs-fresh KV error.
    """

    seq: SeqInput
    prefix_len: int
    reused: torch.Tensor
    segment_runs: list[tuple[int, int]]
    true_error: torch.Tensor | None = None


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

    def top_reused(scores: torch.Tensor, count: int) -> torch.Tensor:
        """The first selection: ``count`` reused positions, as tokens or whole segments (``select_unit``)."""
        if opts.select_unit == "segment":
            return top_segments(scores.cpu(), sit.segment_runs, count)
        return top_k_reused(scores, sit.reused, count)

    if method in ("none", "prefix") or num_reused == 0:
        return PlannedPrefill(sit.seq, dense_layers=layers, recompute=torch.arange(start, n))
    if method == "naive":
        return PlannedPrefill(sit.seq, dense_layers=0, recompute=i_nr)
    if method == "oracle":
        if sit.true_error is None:
            raise ValueError("method 'oracle' needs the true KV error (prefill_request measures it)")
        return PlannedPrefill(sit.seq, 0, union(i_nr, top_reused(sit.true_error, k)))
    if method == "epic":
        return PlannedPrefill(sit.seq, 0, union(i_nr, epic_positions(sit.segment_runs, opts.epic_tokens)))
    width = opts.overflow_blocks * kv.block_size
    before = method == "sparsex" if opts.overflow_before is None else opts.overflow_before
    extras = union(
        overflow_positions(sit.reused, width, start, before=before),
        tail_positions(sit.reused, sit.segment_runs, opts.tail_tokens),
    )
    read = sit.seq

    def query_mass(inp: SelectionInputs) -> torch.Tensor:
        """Sparse-Q: attention of the non-reused queries over every key, summed ([T])."""
        rows = torch.nonzero(fresh[inp.positions.cpu()]).flatten()
        scores = torch.zeros(n)
        for c in range(0, rows.numel(), QUERY_CHUNK):
            r = rows[c : c + QUERY_CHUNK]
            probs = attention_probs(
                inp.q[r], inp.k_fresh, inp.positions[r], scale=spec.attn_scale, window=spec.windows[inp.layer]
            )  # [H, n_r, T]
            scores += sparse_q_scores(probs, n).cpu()
        return scores

    if method == "cacheblend":
        check = min(opts.check_layer, layers - 1)

        def select_dev(inp: SelectionInputs) -> torch.Tensor:
            scores = kv_deviation_scores(inp.k_fresh, inp.k_cached)
            return union(i_nr, top_k_reused(scores, sit.reused, k))

        return PlannedPrefill(read, check + 1, i_nr, select_dev, check)

    if method == "blend":
        # Dense up to the check layer, then *probe* it: project K/V for every token without writing,
        # so tokens that are not selected keep consistent (all-layers) cached KV.
        check = max(1, min(opts.check_layer, layers - 1))

        def blend_scores(inp: SelectionInputs, kind: str, among: torch.Tensor) -> torch.Tensor:
            parts = {"k": kv_deviation_scores(inp.k_fresh, inp.k_cached)}
            if "v" in kind or kind == "impact":
                parts["v"] = kv_deviation_scores(inp.v_fresh, inp.v_cached)
            if "q" in kind or kind == "impact":
                parts["q"] = query_mass(inp).to(parts["k"].device)
            if kind == "impact":  # first-order effect of a stale value on the new queries
                return parts["q"] * parts["v"]
            return sum(normalized(p, among) for p in parts.values())  # type: ignore[return-value]

        def select_blend(inp: SelectionInputs) -> torch.Tensor:
            scores = blend_scores(inp, opts.blend_score, sit.reused.to(inp.k_fresh.device))
            if opts.start_weight:
                prior = segment_start_prior(sit.segment_runs, n).to(scores.device)
                scores = scores.float() + opts.start_weight * prior
            chosen = top_reused(scores, first_k)
            return union(i_nr, chosen, extras) if opts.blend_overflow else union(i_nr, chosen)

        narrow_at = min(opts.narrow_layer, layers - 1)
        narrow = narrow_at > check
        first_k = min(num_reused, int(round(opts.candidates * k))) if narrow else k

        def narrow_blend(inp: SelectionInputs) -> torch.Tensor:
            """Second stage: the budget's top candidates by ``narrow_score`` at ``narrow_layer``."""
            dev = inp.k_fresh.device
            pool = torch.zeros(n, dtype=torch.bool, device=dev)
            pool[inp.positions] = True
            pool &= sit.reused.to(dev)
            pool[extras.to(dev)] = False  # the overflow and tail stay selected
            chosen = top_k_reused(blend_scores(inp, opts.narrow_score, pool), pool, k)
            return union(i_nr, chosen, extras) if opts.blend_overflow else union(i_nr, chosen)

        reused_pos = torch.nonzero(sit.reused).flatten()
        adjust, weight = None, shift_weight(opts, spec.family)
        if weight > 0:
            adjust = segment_shift(kv, spec, sit.seq.block_table, sit.reused, sit.segment_runs, weight)
        shift_from = narrow_at + 1 if narrow else check  # once the recompute set is final
        return PlannedPrefill(
            read, check, i_nr, select_blend, check, probe=True, restore=reused_pos,
            narrow=narrow_blend if narrow else None, narrow_layer=narrow_at, adjust=adjust, adjust_from=shift_from,
        )

    # sparsex: Sparse-Q scores at ℓ* (hybrid) or at layer 0 from the non-reused queries alone.
    lstar = boundary_layer(opts, layers, spec.family) if opts.hybrid else 0

    def select_q(inp: SelectionInputs) -> torch.Tensor:
        return union(i_nr, top_k_reused(query_mass(inp), sit.reused, k), extras)

    if opts.hybrid:
        return PlannedPrefill(read, lstar + 1, i_nr, select_q, lstar)
    return PlannedPrefill(read, 0, i_nr, select_q, 0)


def normalized(scores: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """Scores divided by their mean over ``among`` (so different signals can be added)."""
    return scores / scores[among].float().mean().clamp_min(1e-12)


def compute_fraction(plan: PlannedPrefill, num_layers: int, prompt_len: int, recomputed: int) -> float:
    """Fraction of a full prefill's per-layer token work actually done (a dense layer counts in full).

    A probe (Q/K/V projections of every token at one layer) is counted as a quarter layer, about
    the share of a layer's FLOPs its projections take in these models.
    """
    run = len(plan.seq.token_ids)
    work: float = plan.dense_layers * run + (num_layers - plan.dense_layers) * recomputed
    if plan.narrow is not None and plan.num_candidates:  # the candidates ran dense_layers..narrow_layer
        work += (plan.narrow_layer + 1 - plan.dense_layers) * (plan.num_candidates - recomputed)
    if plan.probe:
        work += 0.25 * run
    elif plan.dense_layers == 0 and plan.select is not None:
        work += plan.recompute.numel() * (plan.select_layer + 1)  # the layer-0 pass of the probe set
    return work / (num_layers * prompt_len)
