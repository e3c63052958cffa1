"""Segment shift: carry the KV correction measured on recomputed tokens to the rest of their segment.

When a segment's context changes, the fresh K/V of its recomputed tokens differ from the cached
ones by a part that is shared across the segment (measured: giving every other token of the
segment the mean difference closes most of what the recomputed tokens leave, see
docs/BENCHMARKS.md). Keys are compared without their rotation (divided by the rotation at their
position) so that the mean is over one frame; the mean is rotated back to each target's position.
Pure tensor functions plus one closure over the request's KV; nothing here decides which tokens run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparsex.kv.paged import KVCache
from sparsex.models.base import ModelSpec, SeqSlice
from sparsex.models.rope import RopeTable, as_pairs


def segment_means(delta: torch.Tensor, segment: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``delta`` ([m, ...]) per segment id (``segment``: [m] in ``0..num_segments-1``).

    Returns (means [num_segments, ...], counts [num_segments]); a segment with no rows has mean 0.
    """
    sums = torch.zeros((num_segments, *delta.shape[1:]), dtype=delta.dtype, device=delta.device)
    sums.index_add_(0, segment, delta)
    counts = torch.bincount(segment, minlength=num_segments)
    shape = (num_segments,) + (1,) * (delta.dim() - 1)
    return sums / counts.clamp_min(1).reshape(shape).to(sums.real.dtype), counts


def segment_shift(
    kv: KVCache, spec: ModelSpec, block_table: list[int], reused: torch.Tensor,
    segment_runs: list[tuple[int, int]], weight: float, weight_v: float | None = None, shrink: float = 0.0,
    not_sources: torch.Tensor | None = None,
) -> Callable[[int, SeqSlice, torch.Tensor, torch.Tensor], None]:
    """A ``before_write`` hook: before a layer overwrites the running reused tokens' cached K/V, add
    ``weight`` x the mean (fresh - cached) difference of each segment's running tokens to the cached
    K/V of that segment's tokens that do not run, in this request's blocks only. ``weight_v``: the
    values' own weight (None = ``weight``); ``shrink``: see :func:`shift_corrections`;
    ``not_sources``: positions that run but are left out of every mean (they still get no shift)."""
    dev = kv.k.device
    n = reused.numel()
    seg_of = torch.full((n,), -1, dtype=torch.int64)
    for j, (a, b) in enumerate(segment_runs):
        seg_of[a:b] = j
    src_of = seg_of.clone()
    if not_sources is not None:
        src_of[not_sources.cpu()] = -1
    seg_of, src_of, reused = seg_of.to(dev), src_of.to(dev), reused.to(dev)
    # Everything that depends only on which tokens run (the same set in every layer after the
    # final selection) is computed once per set; rotations once per RoPE table (Gemma 3 has two).
    plan: dict[str, torch.Tensor] = {}
    rotations: dict[tuple[int, str], torch.Tensor] = {}

    def prepare(positions: torch.Tensor, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        if "positions" in plan and torch.equal(plan["positions"], positions):
            return plan
        rotations.clear()
        seg = src_of[positions]
        src = seg >= 0
        counts = torch.bincount(seg[src], minlength=len(segment_runs))
        idle = reused.clone()
        idle[positions] = False
        targets = torch.nonzero(idle).flatten()
        targets = targets[counts[seg_of[targets]] > 0]
        plan.update(positions=positions, src=torch.nonzero(src).flatten(), src_seg=seg[src],
                    src_pos=positions[src], src_slots=slots[src],
                    targets=targets, t_seg=seg_of[targets], t_slots=kv.slots(block_table, targets))
        return plan

    def rotation(table: RopeTable, which: str, positions: torch.Tensor) -> torch.Tensor:
        """[m, 1, D/2] rotations of ``positions`` ("targets": times ``weight``; "src": inverted)."""
        key = (id(table), which)
        if key not in rotations:
            rot = table.rotary(positions.cpu()).to(dev)[:, None, :]
            rotations[key] = 1.0 / rot if which == "src" else weight * rot
        return rotations[key]

    def adjust(layer: int, seq: SeqSlice, k: torch.Tensor, v: torch.Tensor) -> None:
        p = prepare(seq.positions, seq.slots)
        if p["targets"].numel() == 0:
            return
        table = spec.rope[layer]
        src = p["src"]
        k_old, v_old = kv.gather(layer, p["src_slots"])
        dk, dv = shift_corrections(
            k.index_select(0, src), v.index_select(0, src), k_old, v_old, p["src_seg"], p["t_seg"],
            rotation(table, "src", p["src_pos"]), rotation(table, "targets", p["targets"]),
            len(segment_runs), weight if weight_v is None else weight_v, shrink,
        )
        kv.add(layer, p["t_slots"], dk, dv)

    return adjust


def shift_corrections(
    k_fresh: torch.Tensor, v_fresh: torch.Tensor, k_cached: torch.Tensor, v_cached: torch.Tensor,
    src_seg: torch.Tensor, target_seg: torch.Tensor, src_unrotate: torch.Tensor, target_rotate: torch.Tensor,
    num_segments: int, weight_v: float, shrink: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The segment shift's K/V corrections for the idle target tokens (pure).

    k_fresh, v_fresh, k_cached, v_cached: [m, Hkv, D] the running reused tokens' fresh and cached K/V.
    src_seg: [m] their segment ids; target_seg: [t] the targets' segment ids.
    src_unrotate: [m, 1, D/2] inverse rotations at the sources' positions (keys compared in one frame).
    target_rotate: [t, 1, D/2] the keys' weight x the rotations at the targets' positions.
    weight_v: the values' weight. shrink: each segment's means are scaled by ``m / (m + shrink)``,
    ``m`` its number of sources (0 = no shrinkage).
    Returns (dk, dv): [t, Hkv, D] each, float32: each target's weighted segment mean difference
    (keys rotated to the target's position).
    """
    dk = as_pairs(k_fresh.float() - k_cached.float()) * src_unrotate
    mean_k, counts = segment_means(dk, src_seg, num_segments)
    mean_v, _ = segment_means(v_fresh.float() - v_cached.float(), src_seg, num_segments)
    trust = (counts / (counts + shrink).clamp_min(1)).to(mean_v.dtype)[:, None, None]  # per segment, then gathered
    mean_k, mean_v = mean_k * trust, mean_v * (weight_v * trust)
    shift_k = torch.view_as_real(mean_k[target_seg] * target_rotate).flatten(-2)
    return shift_k, mean_v[target_seg]
