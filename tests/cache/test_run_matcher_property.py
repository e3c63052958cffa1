"""find_runs against a brute-force reference on random small token lists (B = 4, anchors of 2)."""

from __future__ import annotations

from dataclasses import dataclass
from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st

from sparsex.cache import BlockPool, SegmentIndex, run_matcher

B = 4
Run = tuple[int, int, tuple[int, ...], int, tuple[int, ...]]


@dataclass(frozen=True)
class Entry:
    tokens: list[int]
    block_ids: list[int]
    positions: list[int]


def reference_runs(prompt: list[int], entries: list[Entry], min_run: int) -> list[Run]:
    """Every maximal (prompt, entry) match of at least ``min_run`` tokens, then the documented rule:
    longest first (ties: earlier start, smaller first block id, smaller offset); an overlapping
    candidate competes again with its uncovered parts. Quadratic and obvious on purpose."""
    candidates: set[tuple[int, int, int, int]] = set()  # (prompt start, length, entry, entry offset)
    for e_index, entry in enumerate(entries):
        for p in range(len(prompt)):
            for e in range(len(entry.tokens)):
                if p > 0 and e > 0 and prompt[p - 1] == entry.tokens[e - 1]:
                    continue  # not left-maximal
                length = 0
                while (
                    p + length < len(prompt)
                    and e + length < len(entry.tokens)
                    and prompt[p + length] == entry.tokens[e + length]
                ):
                    length += 1
                if length >= min_run:
                    candidates.add((p, length, e_index, e))

    def as_run(start: int, length: int, e_index: int, e: int) -> Run:
        entry = entries[e_index]
        first, last = e // B, (e + length - 1) // B
        blocks = tuple(entry.block_ids[first : last + 1])
        return (start, length, blocks, e % B, tuple(entry.positions[first : last + 1]))

    def rank(c: tuple[int, int, int, int]) -> tuple[int, int, int, int, tuple[int, ...]]:
        run = as_run(*c)
        return (-run[1], run[0], run[2][0], run[3], run[2])

    covered: set[int] = set()
    chosen: list[Run] = []
    while candidates:
        best = min(candidates, key=rank)
        candidates.remove(best)
        start, length, e_index, e = best
        free = [p for p in range(start, start + length) if p not in covered]
        if len(free) == length:
            chosen.append(as_run(*best))
            covered.update(free)
            continue
        pieces: list[list[int]] = []
        for p in free:
            if pieces and pieces[-1][-1] == p - 1:
                pieces[-1].append(p)
            else:
                pieces.append([p])
        for piece in pieces:
            if len(piece) >= min_run:
                candidates.add((piece[0], len(piece), e_index, e + piece[0] - start))
    return sorted(chosen)


tokens = st.integers(0, 3)  # a tiny alphabet: many repeats, overlaps and ties


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[list[int]], list[int], list[int], int]:
    # Each entry starts with its own token, so no two entries share a block (their chains differ
    # from the first block on) and each entry is one chain of blocks, as in the reference.
    bodies = draw(st.lists(st.lists(tokens, min_size=2, max_size=14), min_size=1, max_size=4))
    entries = [[1000 + k, *body] for k, body in enumerate(bodies)]
    starts = draw(st.lists(st.integers(0, 50), min_size=len(entries), max_size=len(entries)))
    min_run = draw(st.sampled_from([3, 4, 5, 7]))
    pieces = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.integers(0, 3)) < 3:  # mostly pieces of entries, cut anywhere, often long enough
            entry = draw(st.sampled_from(entries))
            a = draw(st.integers(0, len(entry) - 1))
            shortest = a + 1 if draw(st.booleans()) else min(len(entry), a + min_run)
            pieces.append(entry[a : draw(st.integers(shortest, len(entry)))])
        else:
            pieces.append(draw(st.lists(tokens, min_size=1, max_size=6)))
    prompt = [t for piece in pieces for t in piece]
    return entries, starts, prompt, min_run


@settings(max_examples=200, deadline=None, database=None)
@given(scenarios())
def test_find_runs_matches_the_brute_force_reference(
    scenario: tuple[list[list[int]], list[int], list[int], int],
) -> None:
    entry_tokens, starts, prompt, min_run = scenario
    pool = BlockPool(num_blocks=64, block_size=B)
    index = SegmentIndex(pool, model_id="m")
    entries = []
    for token_ids, start_pos in zip(entry_tokens, starts, strict=True):
        block_ids = pool.allocate(-(-len(token_ids) // B))
        index.register(token_ids, "", start_pos, dict(enumerate(block_ids)))
        positions = [start_pos + i * B for i in range(len(block_ids))]
        entries.append(Entry(token_ids, block_ids, positions))
    free = pool.num_free_blocks

    match = index.find_runs(prompt, "", min_run)
    got = [(r.prompt_start, r.num_tokens, r.block_ids, r.first_offset, r.positions) for r in match.runs]
    assert got == reference_runs(prompt, entries, min_run)
    index.release_runs(match)
    assert pool.num_free_blocks == free
    assert index.find_runs(prompt, "other", min_run).runs == ()


@settings(max_examples=100, deadline=None, database=None)
@given(scenarios())
def test_past_the_work_budget_runs_stay_verified_disjoint_and_long_enough(
    scenario: tuple[list[list[int]], list[int], list[int], int],
) -> None:
    entry_tokens, starts, prompt, min_run = scenario
    pool = BlockPool(num_blocks=64, block_size=B)
    index = SegmentIndex(pool, model_id="m")
    for token_ids, start_pos in zip(entry_tokens, starts, strict=True):
        index.register(token_ids, "", start_pos, dict(enumerate(pool.allocate(-(-len(token_ids) // B)))))
    free = pool.num_free_blocks
    with patch.object(run_matcher, "WORK_PER_TOKEN", 0), patch.object(run_matcher, "_WORK_FLOOR", 0):
        match = index.find_runs(prompt, "", min_run)
    end = 0
    for run in match.runs:
        assert run.prompt_start >= end and run.num_tokens >= min_run
        end = run.prompt_end
        for j in range(run.num_tokens):
            block_id, slot, _ = run.source(j, B)
            assert pool.info(block_id).token_ids[slot] == prompt[run.prompt_start + j]
    index.release_runs(match)
    assert pool.num_free_blocks == free
