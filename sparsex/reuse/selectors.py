"""Which reused tokens to recompute: pure functions over small tensors.

Positions are absolute token positions in the prompt (int64 tensors). ``reused`` is a
bool mask over positions ``[0, T)``; non-reused positions (``I_nr``) are always recomputed.
Every function here is testable on hand-made 8x4 tensors; none touches a model or a cache.
"""

from __future__ import annotations

import torch


def top_k_reused(scores: torch.Tensor, reused: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` highest ``scores`` among reused positions, ascending.

    scores: [T] float; reused: [T] bool. Ties break toward the earlier position.
    """
    cand = torch.nonzero(reused).flatten()
    k = max(0, min(k, cand.numel()))
    if k == 0:
        return cand[:0]
    s = scores[cand].float()
    # stable ordering: highest score first, then lowest position
    order = torch.argsort(-s, stable=True)[:k]
    return torch.sort(cand[order]).values


def top_segments(scores: torch.Tensor, segment_runs: list[tuple[int, int]], k: int) -> torch.Tensor:
    """Whole reused segments, highest mean score first, until ``k`` positions are taken.

    The segment that crosses ``k`` contributes its ``k - taken`` highest-scoring positions.
    Ties break toward the earlier segment. Returns positions ascending.
    """
    if k <= 0 or not segment_runs:
        return torch.zeros(0, dtype=torch.int64)
    means = torch.stack([scores[a:b].float().mean() for a, b in segment_runs])
    order = torch.argsort(-means, stable=True).tolist()
    out, taken = [], 0
    for i in order:
        a, b = segment_runs[i]
        if taken + (b - a) <= k:
            out.append(torch.arange(a, b))
            taken += b - a
        else:
            best = torch.argsort(-scores[a:b].float(), stable=True)[: k - taken]
            out.append(a + best)
            taken = k
        if taken >= k:
            break
    return torch.sort(torch.cat(out)).values


def sparse_q_scores(probs: torch.Tensor, length: int) -> torch.Tensor:
    """SparseX importance: attention of the non-reused queries, summed over queries and heads.

    probs: [H, N, T'] softmax weights of the N non-reused queries over keys at positions 0..T'-1
        (T' <= length).
    Returns s: [length] with s_j = sum_h sum_i probs[h, i, j].
    """
    s = torch.zeros(length, dtype=torch.float32, device=probs.device)
    s[: probs.shape[-1]] = probs.float().sum(dim=(0, 1))
    return s


def kv_deviation_scores(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """CacheBlend importance: per-token L2 distance between fresh and cached K (or V).

    fresh, cached: [T, H, D]. Returns [T].
    """
    return (fresh.float() - cached.float()).pow(2).sum(dim=(1, 2)).sqrt()


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of True in a 1-D bool mask."""
    m = mask.to(torch.int8)
    edges = torch.diff(torch.cat([m.new_zeros(1), m, m.new_zeros(1)]))
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, ends, strict=True))


def overflow_positions(reused: torch.Tensor, width: int, start: int = 0, before: bool = True) -> torch.Tensor:
    """Reused positions within ``width`` tokens on each side of every non-reused run.

    Only positions >= ``start`` count (the exact prefix before it is never recomputed).
    ``before=False`` keeps only the side after each run.
    """
    t = reused.numel()
    out = torch.zeros(t, dtype=torch.bool, device=reused.device)
    if width <= 0:
        return torch.nonzero(out).flatten()
    nr = ~reused
    nr[:start] = False
    for a, b in runs(nr):
        if before:
            out[max(start, a - width) : a] = True
        out[b : min(t, b + width)] = True
    return torch.nonzero(out & reused).flatten()


def tail_positions(reused: torch.Tensor, segment_runs: list[tuple[int, int]], tokens: int) -> torch.Tensor:
    """If the prompt ends inside a reused segment, that segment's last ``tokens`` positions.

    "Ends inside" means every position after the segment's last reused token up to the end of
    the prompt is at most one token (the always-computed last position).
    """
    t = reused.numel()
    for a, b in segment_runs:
        if b >= t - 1 and b > a:
            lo = max(a, b - tokens)
            return torch.arange(lo, b, device=reused.device)
    return torch.zeros(0, dtype=torch.int64, device=reused.device)


def epic_positions(segment_runs: list[tuple[int, int]], tokens: int) -> torch.Tensor:
    """EPIC / LegoLink: the first ``tokens`` positions of every reused segment."""
    pos = [torch.arange(a, min(b, a + tokens)) for a, b in segment_runs]
    return torch.cat(pos) if pos else torch.zeros(0, dtype=torch.int64)


def segment_start_prior(segment_runs: list[tuple[int, int]], length: int, scale: float = 32.0) -> torch.Tensor:
    """[length] prior ``exp(-(p - start) / scale)`` inside every reused segment, 0 elsewhere.

    A segment's first tokens carry most of its KV error once it moves to a new context (the
    oracle's top tokens fall mostly in the first 64 of each segment), so blend can favour them.
    """
    out = torch.zeros(length)
    for a, b in segment_runs:
        out[a:b] = torch.exp(-torch.arange(b - a, dtype=torch.float32) / scale)
    return out


def union(*parts: torch.Tensor) -> torch.Tensor:
    """Sorted unique union of position tensors."""
    non_empty = [p.flatten().to(torch.int64) for p in parts if p.numel()]
    if not non_empty:
        return torch.zeros(0, dtype=torch.int64)
    out: torch.Tensor = torch.unique(torch.cat(non_empty))
    return out
