"""TokenRun arithmetic and select_runs' choice among overlapping candidates, on hand-made runs."""

from __future__ import annotations

import pytest

from sparsex.cache import RunMatch, TokenRun, select_runs

B = 4


def run(start: int, length: int, first_block: int, first_offset: int = 0) -> TokenRun:
    """A run over consecutive blocks first_block, first_block + 1, ... at positions 100 * id."""
    num_blocks = (first_offset + length - 1) // B + 1
    blocks = tuple(range(first_block, first_block + num_blocks))
    return TokenRun(start, length, blocks, first_offset, tuple(100 * b for b in blocks))


def spans(runs: list[TokenRun]) -> list[tuple[int, int, int]]:
    return [(r.prompt_start, r.prompt_end, r.block_ids[0]) for r in runs]


def test_source_gives_block_slot_and_original_position_of_every_token() -> None:
    r = TokenRun(prompt_start=5, num_tokens=6, block_ids=(11, 4, 9), first_offset=3, positions=(6, 10, 14))
    assert [r.source(j, B) for j in range(6)] == [
        (11, 3, 9),
        (4, 0, 10),
        (4, 1, 11),
        (4, 2, 12),
        (4, 3, 13),
        (9, 0, 14),
    ]
    with pytest.raises(IndexError):
        r.source(6, B)


def test_slice_keeps_only_the_blocks_it_still_covers() -> None:
    r = TokenRun(prompt_start=5, num_tokens=6, block_ids=(11, 4, 9), first_offset=3, positions=(6, 10, 14))
    assert r.slice(5, 11, B) == r
    assert r.slice(6, 10, B) == TokenRun(6, 4, (4,), 0, (10,))
    assert r.slice(5, 7, B) == TokenRun(5, 2, (11, 4), 3, (6, 10))
    assert r.slice(10, 11, B) == TokenRun(10, 1, (9,), 0, (14,))
    with pytest.raises(ValueError, match="non-empty part"):
        r.slice(7, 7, B)
    with pytest.raises(ValueError, match="non-empty part"):
        r.slice(4, 8, B)


def test_longest_first_then_overlapping_runs_keep_their_uncovered_parts() -> None:
    # The docstring's example: A and B tie on length, A starts first; C is covered.
    chosen = select_runs([run(6, 3, 20), run(6, 10, 10), run(0, 10, 0)], min_run=3, block_size=B)
    assert spans(chosen) == [(0, 10, 0), (10, 16, 11)]
    assert chosen[1] == TokenRun(10, 6, (11, 12), 0, (1100, 1200))  # B from its 5th token on


def test_a_run_split_by_a_longer_one_competes_with_both_parts() -> None:
    chosen = select_runs([run(0, 20, 0), run(6, 22, 50)], min_run=4, block_size=B)
    assert spans(chosen) == [(0, 6, 0), (6, 28, 50)]
    long_middle = select_runs([run(0, 20, 0), run(5, 8, 50)], min_run=4, block_size=B)
    assert spans(long_middle) == [(0, 20, 0)]
    middle_first = select_runs([run(0, 9, 0), run(4, 10, 50), run(14, 9, 80)], min_run=4, block_size=B)
    assert spans(middle_first) == [(0, 4, 0), (4, 14, 50), (14, 23, 80)]
    too_short = select_runs([run(0, 9, 0), run(3, 10, 50), run(14, 9, 80)], min_run=4, block_size=B)
    assert spans(too_short) == [(3, 13, 50), (14, 23, 80)]  # a's [0, 3) is below min_run


def test_ties_go_to_the_earlier_start_then_the_smaller_block_then_the_smaller_offset() -> None:
    assert spans(select_runs([run(2, 8, 0), run(0, 8, 9)], 4, B)) == [(0, 8, 9)]
    assert spans(select_runs([run(0, 8, 7), run(0, 8, 3)], 4, B)) == [(0, 8, 3)]
    by_offset = select_runs([run(0, 6, 3, first_offset=2), run(0, 6, 3, first_offset=1)], 4, B)
    assert [r.first_offset for r in by_offset] == [1]
    candidates = [run(s, 5 + s % 3, s % 4) for s in range(12)]
    assert select_runs(candidates, 3, B) == select_runs(list(reversed(candidates)), 3, B)


def test_run_match_lists_one_reference_per_block_use() -> None:
    match = RunMatch((run(0, 5, 3), run(9, 4, 3)))
    assert (match.num_tokens, match.block_ids) == (9, [3, 4, 3])
    assert RunMatch(()).block_ids == []
