"""Content-defined chunking of token ids: cut where the content says so, not at fixed offsets.

A rolling hash (Buzhash: cyclic-shift XOR) covers the last ``window`` token ids. After each token,
the current chunk ends when it is at least ``min_len`` long and ``hash & mask == 0``, or when it
reaches ``max_len``. A candidate cut depends only on the ``window`` tokens before it, so a passage
yields the same interior chunks wherever it appears; once two embeddings of it cut at one common
point, every later cut inside the passage agrees::

    prompt A  | prefix A ......... | P P P P P|P P P P P P|P P P P|P P ... |
    prompt B  | prefix B .. | P P P P P P P P|P P P P P P|P P P P|P P ... |
                                             ^ first common cut: from here on, chunks are equal

The per-token pseudo-random table is a 64-bit integer mix (splitmix64) of the token id: Python's
``hash()`` is salted per process, which would make chunks differ between runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

_MASK64 = (1 << 64) - 1
_SEED = 0x5EED_C0DE_CAFE_F00D


@dataclass(frozen=True)
class ChunkingConfig:
    """Chunk length bounds for automatic segmentation (in tokens)."""

    min_len: int = 64
    """Shortest chunk (except the input's last one); no cut is considered before this length."""
    max_len: int = 512
    """Longest chunk: a cut is forced here when the content offers none."""
    avg_len: int = 256
    """Target mean length; sets the mask so a content cut comes ~every ``avg_len - min_len`` tokens."""
    window: int = 16
    """Number of trailing token ids the rolling hash covers."""

    def __post_init__(self) -> None:
        if self.min_len < 1:
            raise ValueError(f"min_len must be >= 1, got {self.min_len}")
        if not self.min_len <= self.avg_len <= self.max_len:
            raise ValueError(
                f"need min_len <= avg_len <= max_len, got {self.min_len}, {self.avg_len}, {self.max_len}"
            )
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")

    @property
    def mask(self) -> int:
        """Low-bit mask: ``hash & mask == 0`` holds with probability ~1 / (avg_len - min_len)."""
        gap = self.avg_len - self.min_len
        num_bits = round(math.log2(gap)) if gap > 1 else 0
        return (1 << num_bits) - 1

    def chunk(self, token_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Half-open ``(start, end)`` spans that tile ``token_ids`` in order."""
        mask, window, min_len, max_len = self.mask, self.window, self.min_len, self.max_len
        gears = _gear_pairs(window)
        rolling = 0
        spans: list[tuple[int, int]] = []
        start = 0
        for i, token_id in enumerate(token_ids):  # the hot loop of admission: kept inline
            pair = gears.get(token_id)
            if pair is None:
                gear = _gear(token_id)
                pair = gears[token_id] = (gear, _rotl(gear, window))
            rolling = (((rolling << 1) | (rolling >> 63)) & _MASK64) ^ pair[0]
            if i >= window:  # the token leaving the window was rotated `window` times since
                rolling ^= gears[token_ids[i - window]][1]
            length = i + 1 - start
            if length >= max_len or (length >= min_len and rolling & mask == 0):
                spans.append((start, i + 1))
                start = i + 1
        if start < len(token_ids):
            spans.append((start, len(token_ids)))
        return spans


def chunk_tokens(
    token_ids: Sequence[int], min_len: int = 64, max_len: int = 512, avg_len: int = 256, window: int = 16
) -> list[tuple[int, int]]:
    """Content-defined chunks of ``token_ids`` as half-open spans covering the input in order.

    Every chunk is ``min_len..max_len`` tokens long, except the last, which may be shorter."""
    return ChunkingConfig(min_len=min_len, max_len=max_len, avg_len=avg_len, window=window).chunk(token_ids)


_GEAR_CACHE: dict[int, dict[int, tuple[int, int]]] = {}
_GEAR_CACHE_MAX = 1 << 18  # token ids per window length (a vocabulary or two), then start over


def _gear_pairs(window: int) -> dict[int, tuple[int, int]]:
    """Token id -> (its gear, its gear rotated ``window`` times), shared by calls (pure values)."""
    pairs = _GEAR_CACHE.setdefault(window, {})
    if len(pairs) > _GEAR_CACHE_MAX:
        pairs.clear()
    return pairs


def _gear(token_id: int) -> int:
    """Deterministic pseudo-random 64-bit value of a token id (splitmix64 finalizer)."""
    x = (token_id + _SEED + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _rotl(x: int, shift: int) -> int:
    shift %= 64
    return ((x << shift) | (x >> (64 - shift))) & _MASK64
