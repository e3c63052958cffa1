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
from sparsex.models.rope import _as_pairs


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
    rotations: dict[int, torch.Tensor] = {}  # per RoPE table: [n, D/2] complex rotation of every position

    def adjust(layer: int, seq: SeqSlice, k: torch.Tensor, v: torch.Tensor) -> None:
        seg = seg_of[seq.positions]
        src = seg >= 0
        if not bool(src.any()):
            return
        table = spec.rope[layer]
        if id(table) not in rotations:
            rotations[id(table)] = table.rotary(torch.arange(n)).to(dev)[:, None, :]
        rot = rotations[id(table)]
        slots, pos = seq.slots[src], seq.positions[src]
        dk = _as_pairs(k[src].float() - kv.k[layer][slots].float()) / rot[pos]
        dv = v[src].float() - kv.v[layer][slots].float()
        mean_k, counts = segment_means(dk, seg[src], len(segment_runs))
        mean_v, _ = segment_means(dv, seg[src], len(segment_runs))
        idle = reused.clone()
        idle[seq.positions] = False
        targets = torch.nonzero(idle).flatten()
        targets = targets[counts[seg_of[targets]] > 0]
        if targets.numel() == 0:
            return
        t_slots, t_seg = kv.slots(block_table, targets), seg_of[targets]
        shift_k = torch.view_as_real(mean_k[t_seg] * rot[targets]).flatten(-2)
        kv.k[layer].index_copy_(0, t_slots, (kv.k[layer][t_slots].float() + weight * shift_k).to(kv.dtype))
        kv.v[layer].index_copy_(0, t_slots, (kv.v[layer][t_slots].float() + weight * mean_v[t_seg]).to(kv.dtype))

    return adjust
