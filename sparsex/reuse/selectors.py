"""Which reused tokens to recompute: pure functions over small tensors.

Positions are absolute token positions in the prompt (int64 tensors). ``reused`` is a
bool mask over positions ``[0, T)``; non-reused positions (``I_nr``) are always recomputed.
Every function here is testable on hand-made 8x4 tensors; none touches a model or a cache.
"""

from __future__ import annotations

import torch

from sparsex.models.attention import attention_probs

QUERY_CHUNK = 256
"""Non-reused queries scored at a time by ``query_mass`` (bounds the [H, N, T] probability tensor)."""


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


def query_mass(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, fresh: torch.Tensor, *,
    scale: float, window: int | None,
) -> torch.Tensor:
    """Sparse-Q scores over every key from the queries of non-reused tokens.

    q: [N, Hq, D] queries at ``positions`` ([N]); k: [T, Hkv, D] keys at 0..T-1; fresh: [T] bool,
    the non-reused positions. Rows of ``q`` at fresh positions are scored, ``QUERY_CHUNK`` at a time.
    Returns [T] float32 on the CPU: ``sparse_q_scores`` summed over those queries.
    """
    length = fresh.numel()
    rows = torch.nonzero(fresh[positions.cpu()]).flatten()
    scores = torch.zeros(length)
    for c in range(0, rows.numel(), QUERY_CHUNK):
        r = rows[c : c + QUERY_CHUNK]
        probs = attention_probs(q[r], k, positions[r], scale=scale, window=window)  # [H, n_r, T]
        scores += sparse_q_scores(probs, length).cpu()
    return scores


def normalized(scores: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """Scores divided by their mean over ``among`` ([T] bool), so different signals can be added."""
    return scores / scores[among].float().mean().clamp_min(1e-12)


def deviation_scores(
    k_fresh: torch.Tensor, k_cached: torch.Tensor, v_fresh: torch.Tensor, v_cached: torch.Tensor,
    among: torch.Tensor, q_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """blend's score: K deviation + V deviation (+ Sparse-Q mass), each over its mean ``among``.

    k_*, v_*: [T, Hkv, D]; among: [T] bool; q_mass: [T] or None. Returns [T].
    """
    total = normalized(kv_deviation_scores(k_fresh, k_cached), among)
    total = total + normalized(kv_deviation_scores(v_fresh, v_cached), among)
    if q_mass is not None:
        total = total + normalized(q_mass.to(total.device), among)
    return total


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


def sink_positions(reused: torch.Tensor, cached_at: torch.Tensor, tokens: int) -> torch.Tensor:
    """Reused positions whose KV was computed at a position below ``tokens``: the first tokens of
    the prompt that cached them, where attention sinks form (``cached_at``: [T], -1 if not reused)."""
    if tokens <= 0:
        return torch.zeros(0, dtype=torch.int64, device=reused.device)
    return torch.nonzero(reused & (cached_at >= 0) & (cached_at < tokens)).flatten()


def epic_positions(segment_runs: list[tuple[int, int]], tokens: int) -> torch.Tensor:
    """EPIC / LegoLink: the first ``tokens`` positions of every reused segment."""
    pos = [torch.arange(a, min(b, a + tokens)) for a, b in segment_runs]
    return torch.cat(pos) if pos else torch.zeros(0, dtype=torch.int64)


def filter_schedule(k: int, num_reused: int, start: float, steps: int) -> list[int]:
    """CacheBlend's gradual filtering: how many reused tokens each selection keeps.

    The first keeps ``start`` x ``k`` (at most ``num_reused``), each of the ``steps`` following
    ones a linearly smaller number, the last exactly ``k``. Returns ``steps + 1`` sizes
    (``[k]`` when ``steps == 0``: one selection of the budget).
    """
    k = max(0, min(k, num_reused))
    if steps <= 0:
        return [k]
    first = max(k, min(num_reused, int(round(start * k))))
    return [int(round(first - (first - k) * j / steps)) for j in range(steps + 1)]


def union(*parts: torch.Tensor) -> torch.Tensor:
    """Sorted unique union of position tensors."""
    non_empty = [p.flatten().to(torch.int64) for p in parts if p.numel()]
    if not non_empty:
        return torch.zeros(0, dtype=torch.int64)
    out: torch.Tensor = torch.unique(torch.cat(non_empty))
    return out
