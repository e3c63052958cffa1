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

from sparsex.kv_cache import KVCache
from sparsex.models.base import ModelSpec, SeqSlice
from sparsex.models.rope import RopeTable, _as_pairs


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
    segment_runs: list[tuple[int, int]], weight: float,
) -> Callable[[int, SeqSlice, torch.Tensor, torch.Tensor], None]:
    """A ``before_write`` hook: before a layer overwrites the running reused tokens' cached K/V, add
    ``weight`` x the mean (fresh - cached) difference of each segment's running tokens to the cached
    K/V of that segment's tokens that do not run, in this request's blocks only."""
    dev = kv.k.device
    n = reused.numel()
    seg_of = torch.full((n,), -1, dtype=torch.int64)
    for j, (a, b) in enumerate(segment_runs):
        seg_of[a:b] = j
    seg_of, reused = seg_of.to(dev), reused.to(dev)
    # Everything that depends only on which tokens run (the same set in every layer after the
    # final selection) is computed once per set; rotations once per RoPE table (Gemma 3 has two).
    plan: dict[str, torch.Tensor] = {}
    rotations: dict[tuple[int, str], torch.Tensor] = {}

    def prepare(positions: torch.Tensor, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        if "positions" in plan and torch.equal(plan["positions"], positions):
            return plan
        rotations.clear()
        seg = seg_of[positions]
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
        src, slots = p["src"], p["src_slots"]
        k_old, v_old = kv.k[layer].index_select(0, slots).float(), kv.v[layer].index_select(0, slots).float()
        dk = _as_pairs(k.index_select(0, src).float() - k_old) * rotation(table, "src", p["src_pos"])
        mean_k, _ = segment_means(dk, p["src_seg"], len(segment_runs))
        mean_v, _ = segment_means(v.index_select(0, src).float() - v_old, p["src_seg"], len(segment_runs))
        t_slots, t_seg = p["t_slots"], p["t_seg"]
        shift_k = torch.view_as_real(mean_k[t_seg] * rotation(table, "targets", p["targets"])).flatten(-2)
        kv.k[layer].index_add_(0, t_slots, shift_k.to(kv.dtype))
        kv.v[layer].index_add_(0, t_slots, (weight * mean_v)[t_seg].to(kv.dtype))

    return adjust
