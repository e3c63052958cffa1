"""Seeded bootstrap intervals over work items (pure Python, reproducible).

A cell of an evaluation table is a statistic over the items of one workload (a mean, or a ratio of
means such as the share of naive's KL gap closed). Its interval resamples the *items* with
replacement; statistics that pair two methods (gap closed: method against naive) resample the same
item indices for both, so the interval reflects item-to-item variation once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

RESAMPLES = 1000
LEVEL = 0.95


def bootstrap_interval(
    n: int,
    statistic: Callable[[Sequence[int]], float | None],
    *,
    seed: str | int,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
) -> tuple[float, float] | None:
    """Percentile interval of ``statistic(indices)`` over ``resamples`` resamples of ``range(n)``.

    ``seed`` fixes the resamples (same seed, same interval). Resamples whose statistic is None
    (undefined, e.g. a ratio over a zero mean) are skipped; None when n == 0 or none is defined.
    """
    if n <= 0:
        return None
    rng = random.Random(f"sparsex-bootstrap:{seed}")
    values = []
    for _ in range(resamples):
        v = statistic([rng.randrange(n) for _ in range(n)])
        if v is not None:
            values.append(v)
    if not values:
        return None
    values.sort()
    tail = (1.0 - level) / 2.0
    lo = values[max(0, math.floor(tail * len(values)))]
    hi = values[min(len(values) - 1, math.ceil((1.0 - tail) * len(values)) - 1)]
    return lo, hi


def mean_of(values: Sequence[float]) -> Callable[[Sequence[int]], float | None]:
    """The statistic "mean of ``values`` at the resampled indices"."""
    return lambda idx: sum(values[i] for i in idx) / len(idx)


def median_of(values: Sequence[float]) -> Callable[[Sequence[int]], float | None]:
    """The statistic "median of ``values`` at the resampled indices"."""

    def stat(idx: Sequence[int]) -> float | None:
        picked = sorted(values[i] for i in idx)
        mid = len(picked) // 2
        return picked[mid] if len(picked) % 2 else (picked[mid - 1] + picked[mid]) / 2

    return stat


def gap_closed_of(kl: Sequence[float], naive_kl: Sequence[float]) -> Callable[[Sequence[int]], float | None]:
    """The statistic ``1 - mean(kl) / mean(naive_kl)`` over the same resampled items (paired)."""

    def stat(idx: Sequence[int]) -> float | None:
        base = sum(naive_kl[i] for i in idx)
        return None if base <= 0.0 else 1.0 - sum(kl[i] for i in idx) / base

    return stat
