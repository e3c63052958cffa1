"""TokenRun and RunMatch: cached token runs of a prompt with exact source positions, and the
rule that picks disjoint runs among overlapping candidates.

Run arithmetic (``B`` tokens per block; every block of an entry but its last is full)::

    B = 4; a run of 6 tokens at prompt 5 from entry blocks 11, 4, 9 computed at positions 6, 10, 14

    entry     | e0 e1 e2 e3 | e4 e5 e6 e7 | e8 e9 |
    blocks    |  block 11   |   block 4   | blk 9 |
    run                 e3  | e4 e5 e6 e7 | e8          first_offset = 3 (slot of e3 in block 11)
    prompt    ... 5th:  e3    e4 e5 e6 e7   e8 ...      prompt_start = 5, num_tokens = 6

    run token j:  k = first_offset + j      block  block_ids[k // B], slot k % B
                                            was at positions[k // B] + k % B, now at prompt_start + j
    (j = 0: block 11 slot 3, was at 9, now at 5: its key is rotated by 5 - 9 = -4 positions)
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenRun:
    """A prompt run whose KV a cached entry holds, with exact source positions (see module doc)."""

    prompt_start: int
    """First prompt position the run covers."""
    num_tokens: int
    """Length of the run; it covers prompt positions ``[prompt_start, prompt_start + num_tokens)``."""
    block_ids: tuple[int, ...]
    """The entry's blocks covering the run, in entry order (each holds at least one run token)."""
    first_offset: int
    """Slot of the run's first token inside ``block_ids[0]``."""
    positions: tuple[int, ...]
    """Absolute position each block's first slot had when its KV was computed."""

    @property
    def prompt_end(self) -> int:
        return self.prompt_start + self.num_tokens

    def source(self, j: int, block_size: int) -> tuple[int, int, int]:
        """``(block id, slot in block, original position)`` of run token ``j``."""
        if not 0 <= j < self.num_tokens:
            raise IndexError(f"run token {j} outside [0, {self.num_tokens})")
        k = self.first_offset + j
        return (
            self.block_ids[k // block_size],
            k % block_size,
            self.positions[k // block_size] + k % block_size,
        )

    def slice(self, start: int, end: int, block_size: int) -> TokenRun:
        """The part of the run covering prompt positions ``[start, end)`` (a non-empty sub-range)."""
        if not self.prompt_start <= start < end <= self.prompt_end:
            raise ValueError(
                f"[{start}, {end}) is not a non-empty part of [{self.prompt_start}, {self.prompt_end})"
            )
        k = self.first_offset + start - self.prompt_start
        first, last = k // block_size, (k + end - start - 1) // block_size
        return TokenRun(
            start,
            end - start,
            self.block_ids[first : last + 1],
            k % block_size,
            self.positions[first : last + 1],
        )


@dataclass(frozen=True)
class RunMatch:
    """What :meth:`SegmentIndex.find_runs` returns: disjoint runs sorted by ``prompt_start``."""

    runs: tuple[TokenRun, ...]
    """One pool reference is held per entry of every run's ``block_ids`` (a block used by two runs
    is referenced twice); the caller gives them back with :meth:`SegmentIndex.release_runs`."""

    @property
    def num_tokens(self) -> int:
        return sum(run.num_tokens for run in self.runs)

    @property
    def block_ids(self) -> list[int]:
        """Every referenced block id, run after run (with repeats, one per reference)."""
        return [block_id for run in self.runs for block_id in run.block_ids]


def select_runs(candidates: Iterable[TokenRun], min_run: int, block_size: int) -> list[TokenRun]:
    """Choose disjoint runs, longest first; a run overlapping chosen ones competes again with its
    uncovered parts (each at least ``min_run`` long). Sorted by prompt start.

    Tie rule, in order: more tokens, earlier ``prompt_start``, smaller first block id, smaller
    ``first_offset``, then the smaller ``block_ids`` tuple. Greedy, so not always the cover with
    the most tokens, but deterministic and O(k log k) for k candidates::

        candidates   A [0, 10)   B [6, 16)   C [6, 9)        chosen: A (first of two of 10 tokens),
        min_run 3    then B's part [10, 16) (6 tokens), C is covered: [0, 10) from A, [10, 16) from B
    """
    heap = [(_rank(run), seq, run) for seq, run in enumerate(candidates)]
    heapq.heapify(heap)
    seq = len(heap)
    starts: list[int] = []  # chosen runs as sorted disjoint intervals
    ends: list[int] = []
    chosen: list[TokenRun] = []
    while heap:
        _, _, run = heapq.heappop(heap)
        pieces = _uncovered(starts, ends, run.prompt_start, run.prompt_end)
        if pieces == [(run.prompt_start, run.prompt_end)]:
            at = bisect_left(starts, run.prompt_start)
            starts.insert(at, run.prompt_start)
            ends.insert(at, run.prompt_end)
            chosen.append(run)
            continue
        for start, end in pieces:
            if end - start >= min_run:
                part = run.slice(start, end, block_size)
                heapq.heappush(heap, (_rank(part), seq, part))
                seq += 1
    return sorted(chosen, key=lambda run: run.prompt_start)


def _rank(run: TokenRun) -> tuple[int, int, int, int, tuple[int, ...]]:
    return (-run.num_tokens, run.prompt_start, run.block_ids[0], run.first_offset, run.block_ids)


def _uncovered(starts: list[int], ends: list[int], start: int, end: int) -> list[tuple[int, int]]:
    """Parts of ``[start, end)`` outside the sorted disjoint intervals ``[starts[i], ends[i])``."""
    pieces: list[tuple[int, int]] = []
    cursor = start
    at = bisect_right(ends, start)  # the first interval ending after `start`
    while at < len(starts) and starts[at] < end:
        if cursor < starts[at]:
            pieces.append((cursor, starts[at]))
        cursor = max(cursor, ends[at])
        at += 1
    if cursor < end:
        pieces.append((cursor, end))
    return pieces
