"""Any-offset runs (SegmentIndex.find_runs): exact positions, overlaps, collisions, eviction, refs."""

from __future__ import annotations

import sys

import pytest

from sparsex.cache import (
    BlockHash,
    BlockPool,
    HashFn,
    PrefixCache,
    RunMatcher,
    SegmentIndex,
    TokenRun,
    default_hash_fn,
)

B = 4
ENTRY = list(range(100, 110))  # 10 tokens: blocks [100..103] [104..107] [108 109]
Run = tuple[int, int, tuple[int, ...], int, tuple[int, ...]]


def store(index: SegmentIndex, token_ids: list[int], namespace: str = "", start_pos: int = 0) -> list[int]:
    """What the engine does after computing an entry's KV: store only its missing blocks."""
    missing = index.missing_blocks(token_ids, namespace)
    block_ids = index.pool.allocate(len(missing))
    index.register(token_ids, namespace, start_pos, dict(zip(missing, block_ids, strict=True)))
    return block_ids


def runs(
    index: SegmentIndex, prompt: list[int], namespace: str = "", min_run: int | None = None
) -> list[Run]:
    """find_runs, check every token against its source block, release, and flatten to tuples."""
    match = index.find_runs(prompt, namespace, min_run)
    for run in match.runs:
        for j in range(run.num_tokens):
            block_id, slot, position = run.source(j, index.pool.block_size)
            info = index.pool.info(block_id)
            assert info.token_ids[slot] == prompt[run.prompt_start + j]
            assert info.position is not None and position == info.position + slot
            assert info.ref_count >= 1
    index.release_runs(match)
    return [(r.prompt_start, r.num_tokens, r.block_ids, r.first_offset, r.positions) for r in match.runs]


def filler(count: int, base: int = 500) -> list[int]:
    return list(range(base, base + count))


def make(num_blocks: int = 16, hash_fn: HashFn = default_hash_fn) -> SegmentIndex:
    return SegmentIndex(BlockPool(num_blocks=num_blocks, block_size=B), model_id="m", hash_fn=hash_fn)


def test_runs_at_every_prompt_offset_and_every_entry_offset() -> None:
    index = make()
    assert store(index, ENTRY, start_pos=20) == [0, 1, 2]
    positions = (20, 24, 28)
    for prompt_offset in range(6):
        for entry_offset in range(len(ENTRY) - B + 1):
            for length in sorted({B, len(ENTRY) - entry_offset}):
                piece = ENTRY[entry_offset : entry_offset + length]
                prompt = filler(prompt_offset) + piece + filler(3, base=600)
                first, last = entry_offset // B, (entry_offset + length - 1) // B
                expected = (prompt_offset, length, (0, 1, 2)[first : last + 1], entry_offset % B)
                assert runs(index, prompt) == [(*expected, positions[first : last + 1])], (
                    prompt_offset,
                    entry_offset,
                    length,
                )
    assert index.pool.num_free_blocks == 16


def test_a_run_starting_mid_entry_reaches_the_partial_last_block_by_extension() -> None:
    index = make()
    store(index, ENTRY, start_pos=6)
    prompt = [1, 2, 3, 4, 5, *ENTRY[3:9], 9]  # e3..e8 at prompt 5..10
    assert runs(index, prompt) == [(5, 6, (0, 1, 2), 3, (6, 10, 14))]
    assert runs(index, [7, *ENTRY[5:]]) == [(1, 5, (1, 2), 1, (10, 14))]  # ends with the entry
    assert runs(index, ENTRY[7:] + [1, 2]) == []  # 3 tokens: shorter than a block
    assert runs(index, ENTRY[7:] + [1, 2], min_run=3) == [(0, 3, (1, 2), 3, (10, 14))]


def test_two_entries_in_one_prompt_and_the_same_entry_twice() -> None:
    index = make()
    other = list(range(200, 208))
    store(index, ENTRY, start_pos=0)  # blocks 0, 1, 2
    store(index, other, start_pos=50)  # blocks 3, 4
    prompt = other[2:] + filler(2) + ENTRY[1:6] + ENTRY
    assert runs(index, prompt) == [
        (0, 6, (3, 4), 2, (50, 54)),
        (8, 5, (0, 1), 1, (0, 4)),
        (13, 10, (0, 1, 2), 0, (0, 4, 8)),
    ]
    match = index.find_runs(prompt, "")
    assert [index.pool.info(b).ref_count for b in range(5)] == [2, 2, 1, 1, 1]  # one per use
    index.release_runs(match)
    assert index.pool.num_free_blocks == 16


def test_a_run_across_two_adjacent_entries_is_two_runs() -> None:
    index = make()
    first, second = list(range(100, 108)), list(range(200, 208))
    store(index, first, start_pos=0)  # blocks 0, 1
    store(index, second, start_pos=8)  # blocks 2, 3: computed right after `first`
    prompt = first[3:] + second[:6]
    assert runs(index, prompt) == [(0, 5, (0, 1), 3, (0, 4)), (5, 6, (2, 3), 0, (8, 12))]


def test_overlapping_candidates_longest_first_then_trimmed() -> None:
    index = make()
    a = list(range(100, 110))
    b = a[6:] + list(range(300, 306))  # starts with a's last 4 tokens
    store(index, a, start_pos=0)  # blocks 0, 1, 2 (2 = [108 109])
    store(index, b, start_pos=40)  # blocks 3 [106..109], 4 [300..303], 5 [304 305]
    # Both candidates have 10 tokens: a at [0, 10) wins (earlier start); b keeps [10, 16).
    assert runs(index, a + b[4:]) == [(0, 10, (0, 1, 2), 0, (0, 4, 8)), (10, 6, (4, 5), 0, (44, 48))]
    # b is longer here (9 tokens vs a's 7): a keeps only its uncovered [0, 3), too short to keep.
    assert runs(index, a[3:] + b[4:]) == [(3, 10, (3, 4, 5), 0, (40, 44, 48))]
    assert runs(index, a[3:] + b[4:], min_run=3) == [
        (0, 3, (0, 1), 3, (0, 4)),
        (3, 10, (3, 4, 5), 0, (40, 44, 48)),
    ]


def test_the_same_tokens_in_two_entries_tie_to_the_smaller_block_id() -> None:
    index = make()
    doc = list(range(100, 108))
    store(index, [7, 7, *doc], start_pos=0)  # blocks 0, 1, 2: doc at entry offset 2
    store(index, [5, *doc], start_pos=30)  # blocks 3, 4, 5: doc at entry offset 1
    assert runs(index, doc) == [(0, 8, (0, 1, 2), 2, (0, 4, 8))]
    assert runs(index, doc) == runs(index, doc)  # deterministic, whatever the scan met first
    store(index, doc, start_pos=90)  # blocks 6, 7: the doc alone, also 8 tokens
    assert runs(index, doc) == [(0, 8, (0, 1, 2), 2, (0, 4, 8))]
    assert runs(index, [5, *doc]) == [(0, 9, (3, 4, 5), 0, (30, 34, 38))]  # longer wins


def test_shared_leading_blocks_extend_down_the_child_that_matches() -> None:
    index = make()
    head = [1, 2, 3, 4]
    store(index, head + [10, 11, 12, 13], start_pos=0)  # blocks 0, 1
    assert store(index, head + [20, 21, 22, 23, 24], start_pos=9) == [2, 3]  # block 0 is shared
    assert runs(index, [9, 2, 3, 4, 20, 21, 22, 23, 24, 9]) == [(1, 8, (0, 2, 3), 1, (0, 13, 17))]
    assert runs(index, [9, 3, 4, 10, 11, 12, 9]) == [(1, 5, (0, 1), 2, (0, 4))]


def test_colliding_window_hashes_never_serve_wrong_blocks() -> None:
    # Anchors are dict keys of their token ids: Python hashes t and t + modulus equally (and so
    # their tuples), so here every evil window lands in the bucket of a cached one; only the
    # key's equality check stands between them and a wrong match.
    modulus = sys.hash_info.modulus
    evil = [t + modulus for t in ENTRY]
    assert all(hash(tuple(evil[i : i + 2])) == hash(tuple(ENTRY[i : i + 2])) for i in range(len(ENTRY) - 1))
    index = make()
    store(index, ENTRY, start_pos=0)
    store(index, list(range(200, 210)), start_pos=10)
    assert runs(index, filler(3) + ENTRY[2:]) == [(3, 8, (0, 1, 2), 2, (0, 4, 8))]
    assert runs(index, list(range(300, 320))) == []
    assert runs(index, evil) == []
    assert runs(index, ENTRY[:5] + evil[5:]) == [(0, 5, (0, 1), 0, (0, 4))]
    assert runs(index, evil[:5] + ENTRY[5:]) == [(5, 5, (1, 2), 1, (4, 8))]


def test_colliding_chain_hashes_leave_blocks_unindexed() -> None:
    index = make(hash_fn=lambda data: b"x")
    store(index, ENTRY)
    assert index.run_matcher.num_blocks == 1  # blocks 1 and 2 collided: unpublished, unindexed
    assert runs(index, ENTRY) == [(0, 4, (0,), 0, (0,))]
    assert runs(index, list(range(104, 110))) == []


def test_eviction_drops_blocks_from_the_index() -> None:
    index = make(num_blocks=3)
    pool = index.pool
    store(index, ENTRY)  # LRU: 2, 1, 0
    pool.release(pool.allocate(1))  # evicts block 2 (the tail): the run stops before it
    assert (index.run_matcher.num_blocks, 2 in index.run_matcher) == (2, False)
    assert runs(index, ENTRY) == [(0, 8, (0, 1), 0, (0, 4))]
    assert pool.clear_cached() == 2
    assert index.run_matcher.num_blocks == 0
    assert runs(index, ENTRY) == []


def test_a_middle_block_evicted_then_stored_again_rejoins_its_entry() -> None:
    index = make(num_blocks=4)
    pool = index.pool
    store(index, ENTRY, start_pos=0)  # blocks 0, 1, 2; LRU: 2, 1, 0
    busy = pool.allocate(1)  # block 3, so the next allocation must evict
    assert runs(index, ENTRY[8:] + [1, 2, 3]) == []  # no run, but nothing is hit either
    pool.incref([2])
    pool.release([2])  # LRU: 1, 0, 2
    held = pool.allocate(1)  # evicts block 1, the middle of the entry
    assert (held, 1 in index.run_matcher) == ([1], False)
    assert runs(index, ENTRY) == [(0, 4, (0,), 0, (0,))]  # stops at the hole
    pool.release(busy)  # block 3 back on the empty stack
    assert store(index, ENTRY, start_pos=70) == [3]  # only block 1's tokens were missing
    assert runs(index, ENTRY) == [(0, 10, (0, 3, 2), 0, (0, 74, 8))]  # per-block original positions
    pool.release(held)
    assert pool.num_free_blocks == 4


def test_namespaces_and_models_never_share_runs() -> None:
    index = make()
    store(index, ENTRY, namespace="a")
    assert runs(index, ENTRY, namespace="b") == []
    store(index, ENTRY, namespace="b", start_pos=5)  # blocks 3, 4, 5
    assert runs(index, ENTRY, namespace="a") == [(0, 10, (0, 1, 2), 0, (0, 4, 8))]
    assert runs(index, ENTRY, namespace="b") == [(0, 10, (3, 4, 5), 0, (5, 9, 13))]
    assert runs(index, ENTRY, namespace="") == []
    other_model = SegmentIndex(BlockPool(16, B), model_id="other")
    assert runs(other_model, ENTRY, namespace="a") == []


def test_prefix_cache_blocks_are_not_runs() -> None:
    index = make()
    prefix = PrefixCache(index.pool, model_id="m")
    table = index.pool.allocate(2)
    prefix.register(ENTRY[:8], table, "", num_exact_tokens=8)
    index.pool.release(table)
    assert runs(index, ENTRY) == []
    assert index.pool.clear_cached() == 2  # evicting them leaves the run index alone
    assert index.run_matcher.num_blocks == 0


def test_references_are_taken_per_block_and_pinned_segments_are_credited() -> None:
    index = make()
    pool = index.pool
    index.register(ENTRY, "", 0, dict(enumerate(pool.allocate(3))), pinned=True)
    free = pool.num_free_blocks
    match = index.find_runs(filler(2) + ENTRY[2:7], "")
    assert match.block_ids == [0, 1] and match.num_tokens == 5
    assert [pool.info(b).ref_count for b in range(3)] == [1, 1, 0]
    index.release_runs(match)
    assert pool.num_free_blocks == free
    assert [s.num_hits for s in index.list_pinned()] == [1]


def test_min_run_is_configurable_down_to_what_the_anchors_guarantee() -> None:
    index = make()
    store(index, ENTRY)
    prompt = [1, *ENTRY[1:6], 2]  # a 5-token run
    assert runs(index, prompt, min_run=5) == [(1, 5, (0, 1), 1, (0, 4))]
    assert runs(index, prompt, min_run=6) == []
    assert index.run_matcher.min_findable_run == 3
    with pytest.raises(ValueError, match="min_run must be >= 3"):
        index.find_runs(prompt, "", min_run=2)
    assert runs(index, [], min_run=3) == []


def test_anchor_length_defaults_to_the_largest_divisor_that_finds_every_block_run() -> None:
    lengths = {b: RunMatcher(b).anchor_len for b in (1, 2, 3, 4, 6, 8, 16)}
    assert lengths == {1: 1, 2: 1, 3: 1, 4: 2, 6: 3, 8: 4, 16: 8}
    assert RunMatcher(16).min_findable_run == 15
    with pytest.raises(ValueError, match="divide"):
        RunMatcher(16, anchor_len=5)


def test_add_block_is_idempotent_and_checked() -> None:
    matcher = RunMatcher(B)
    chain = BlockHash(default_hash_fn(b"c0"))
    matcher.add_block(7, chain, None, (1, 2, 3, 4), 0, "")
    matcher.add_block(7, chain, None, (1, 2, 3, 4), 0, "")
    assert matcher.num_blocks == 1
    with pytest.raises(ValueError, match="another chain hash"):
        matcher.add_block(7, BlockHash(default_hash_fn(b"c1")), None, (1, 2, 3, 4), 0, "")
    with pytest.raises(ValueError, match="already indexed"):
        matcher.add_block(8, chain, None, (1, 2, 3, 4), 0, "")
    assert matcher.find([0, 1, 2, 3, 4, 0], "") == (TokenRun(1, 4, (7,), 0, (0,)),)
    matcher.drop_block(7)
    matcher.drop_block(99)  # unknown ids are ignored
    assert (matcher.num_blocks, matcher.find([1, 2, 3, 4], "")) == (0, ())


def test_a_tail_too_short_for_an_anchor_is_reached_by_extension_and_evicted_last() -> None:
    index = make(num_blocks=3)
    pool = index.pool
    store(index, ENTRY[:9], start_pos=3)  # blocks 0, 1, 2; block 2 = [108] holds no anchor
    assert runs(index, [1, *ENTRY[5:9]]) == [(1, 4, (1, 2), 1, (7, 11))]  # LRU now: 0, 2, 1
    pool.incref([2])
    held = pool.allocate(2)  # evicts 0 and 1: the namespace's last anchors go first
    assert (held, index.run_matcher.num_blocks) == ([0, 1], 1)
    pool.release([2])
    assert pool.clear_cached() == 1
    assert index.run_matcher.num_blocks == 0
    pool.release(held)


def test_repetitive_content_is_covered_by_verified_runs_within_the_work_budget() -> None:
    index = make(num_blocks=32)
    store(index, [7] * 40)  # 10 blocks with one content: 20 anchors share one hash
    # ~20 candidate diagonals per position: past the work budget, hits inside found runs are
    # skipped. Still verified token by token (runs() checks), disjoint, and nearly everything.
    found = runs(index, [7] * 400)
    spans = [(start, start + length) for start, length, *_ in found]
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))
    assert sum(end - start for start, end in spans) >= 390
