"""SegmentIndex: position-independent hits, partial hits, isolation, pinning and pressure."""

from __future__ import annotations

import pytest

from sparsex.cache import BlockPool, SegmentIndex


def collide(data: bytes) -> bytes:
    return b"x"


def store(
    index: SegmentIndex,
    token_ids: list[int],
    namespace: str = "",
    start_pos: int = 0,
    pinned: bool = False,
    name: str | None = None,
) -> tuple[str | None, list[int]]:
    """What the engine does after computing a segment's KV: store only the missing blocks."""
    missing = index.missing_blocks(token_ids, namespace)
    block_ids = index.pool.allocate(len(missing))
    segment_id = index.register(
        token_ids, namespace, start_pos, dict(zip(missing, block_ids, strict=True)), pinned, name
    )
    return segment_id, block_ids


def hit_ids(index: SegmentIndex, token_ids: list[int], namespace: str = "") -> list[int]:
    """Match, then release the hit blocks as the engine does after copying them."""
    hit = index.match(token_ids, namespace)
    index.pool.release(hit.block_ids)
    return hit.block_ids


SEGMENT = list(range(100, 110))  # 10 tokens: with B = 4, two full blocks and a partial one


def test_same_segment_hits_at_any_offset_with_original_positions() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    index = SegmentIndex(pool, model_id="m")
    assert index.missing_blocks(SEGMENT, "") == [0, 1, 2]
    assert store(index, SEGMENT, start_pos=13) == (None, [0, 1, 2])
    assert pool.num_free_blocks == 8  # unpinned: owned by the LRU list, not by the index
    hit = index.match(SEGMENT, "")
    assert (hit.block_ids, hit.positions, hit.num_tokens) == ([0, 1, 2], [13, 17, 21], 10)
    assert [pool.info(b).ref_count for b in hit.block_ids] == [1, 1, 1]
    assert pool.info(2).token_ids == (108, 109)  # the partial last block
    pool.release(hit.block_ids)
    assert index.missing_blocks(SEGMENT, "") == []


def test_partial_hits_cover_leading_blocks_only() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    index = SegmentIndex(pool, model_id="m")
    store(index, SEGMENT)
    edited = SEGMENT[:6] + [999] + SEGMENT[7:]
    hit = index.match(edited, "")
    assert (hit.block_ids, hit.num_tokens) == ([0], 4)
    pool.release(hit.block_ids)
    assert index.missing_blocks(edited, "") == [1, 2]
    assert hit_ids(index, SEGMENT[:8]) == [0, 1]
    longer = SEGMENT + [110, 111]  # block 2 is now full: it is not the stored partial block
    assert hit_ids(index, longer) == [0, 1]
    assert index.missing_blocks(longer, "") == [2]
    assert index.match([], "").block_ids == []


def test_completing_a_partial_hit_stores_only_the_missing_block_at_its_own_position() -> None:
    pool = BlockPool(num_blocks=3, block_size=4)
    index = SegmentIndex(pool, model_id="m")
    store(index, SEGMENT, start_pos=0)  # LRU: 2, 1, 0 (a chain's tail is evicted first)
    pool.release(pool.allocate(1))  # evicts block 2, which returns to the empty list
    assert index.missing_blocks(SEGMENT, "") == [2]
    assert hit_ids(index, SEGMENT) == [0, 1]
    assert store(index, SEGMENT, start_pos=50) == (None, [2])
    hit = index.match(SEGMENT, "")
    assert (hit.block_ids, hit.positions) == ([0, 1, 2], [0, 4, 58])


def test_namespaces_never_hit_each_other() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    index = SegmentIndex(pool, model_id="m")
    store(index, SEGMENT, namespace="a")
    assert hit_ids(index, SEGMENT, namespace="b") == []
    assert index.missing_blocks(SEGMENT, "b") == [0, 1, 2]
    assert store(index, SEGMENT, namespace="b")[1] == [3, 4, 5]
    assert hit_ids(index, SEGMENT, namespace="a") == [0, 1, 2]
    assert hit_ids(index, SEGMENT, namespace="b") == [3, 4, 5]
    assert hit_ids(index, SEGMENT, namespace="") == []
    assert hit_ids(SegmentIndex(BlockPool(8, 4), model_id="other"), SEGMENT, "a") == []


def test_colliding_hash_never_serves_wrong_blocks() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    index = SegmentIndex(pool, model_id="m", hash_fn=collide)
    store(index, [1, 2, 3, 4, 5, 6])
    assert pool.num_cached_blocks == 1  # block 1 collides with block 0: left unpublished
    hit = index.match([1, 2, 3, 4, 5, 6], "")
    assert (hit.block_ids, hit.num_tokens) == ([0], 4)
    pool.release(hit.block_ids)
    assert hit_ids(index, [7, 8, 9, 10]) == []
    assert hit_ids(index, [5, 6]) == []
    assert index.missing_blocks([1, 2, 3, 4, 5, 6], "") == [1]


def test_a_racing_duplicate_store_frees_its_blocks() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    index = SegmentIndex(pool, model_id="m")
    first, second = pool.allocate(3), pool.allocate(3)  # two requests missed the same segment
    index.register(SEGMENT, "", 0, dict(enumerate(first)))
    index.register(SEGMENT, "", 9, dict(enumerate(second)))
    assert pool.num_cached_blocks == 3
    assert hit_ids(index, SEGMENT) == first
    # The duplicates were freed without a hash: back on the empty stack, above 6 and 7.
    assert pool.allocate(5) == [3, 4, 5, 6, 7]


def test_register_validates_before_changing_anything() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    index = SegmentIndex(pool, model_id="m")
    blocks = pool.allocate(3)
    for bad_args, message in [
        (([], "", 0, {}), "empty"),
        ((SEGMENT, "", -1, {0: blocks[0]}), "start_pos"),
        ((SEGMENT, "", 0, {3: blocks[0]}), "outside"),
        ((SEGMENT, "", 0, {0: blocks[0], 1: blocks[0]}), "same block id"),
        ((SEGMENT, "", 0, {0: 7}), "no reference"),
    ]:
        with pytest.raises(ValueError, match=message):
            index.register(*bad_args)
    with pytest.raises(ValueError, match=r"uncached blocks \[1, 2\]"):
        index.register(SEGMENT, "", 0, {0: blocks[0]}, pinned=True)
    assert [pool.info(b).ref_count for b in blocks] == [1, 1, 1]
    assert pool.num_cached_blocks == 0


def test_pinned_segment_lifecycle() -> None:
    pool = BlockPool(num_blocks=8, block_size=4, high_water=1.0)
    index = SegmentIndex(pool, model_id="m")
    segment_id, blocks = store(index, SEGMENT, namespace="kb", start_pos=5, pinned=True, name="manual")
    assert segment_id == index.segment_id(SEGMENT, "kb") and segment_id is not None
    assert (pool.num_pinned_blocks, pool.num_free_blocks) == (3, 5)
    [pinned] = index.list_pinned()
    assert (pinned.name, pinned.namespace, pinned.num_tokens, pinned.num_blocks) == ("manual", "kb", 10, 3)
    assert (pinned.num_hits, pinned.block_ids) == (0, (0, 1, 2))
    assert index.list_pinned(namespace="other") == []
    assert hit_ids(index, SEGMENT, "kb") == [0, 1, 2]
    assert hit_ids(index, SEGMENT[:4], "kb") == [0]
    assert hit_ids(index, SEGMENT, "") == []
    found = index.get_pinned(segment_id)
    assert found is not None and found.num_hits == 2
    assert pool.allocate(5) == [3, 4, 5, 6, 7]  # the pinned blocks are never handed out
    assert index.unpin(segment_id) and not index.unpin(segment_id)
    assert index.get_pinned(segment_id) is None
    assert (pool.num_pinned_blocks, pool.num_free_blocks) == (0, 3)
    assert hit_ids(index, SEGMENT, "kb") == [0, 1, 2]  # unpinned segments stay cached in the LRU


def test_pinning_an_already_cached_segment_pins_its_cached_blocks() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    index = SegmentIndex(pool, model_id="m")
    store(index, SEGMENT)
    segment_id = index.register(SEGMENT, "", 0, {}, pinned=True, name="a")
    assert segment_id is not None
    assert (pool.num_pinned_blocks, pool.num_free_blocks) == (3, 5)
    assert index.register(SEGMENT, "", 0, {}, pinned=True, name="b") == segment_id  # no-op, new name
    assert [pool.info(b).pin_count for b in range(3)] == [1, 1, 1]
    assert [s.name for s in index.list_pinned()] == ["b"]


def test_pinned_segments_sharing_a_block_pin_it_twice() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    index = SegmentIndex(pool, model_id="m")
    id_a, blocks_a = store(index, [1, 2, 3, 4, 5, 6, 7, 8], pinned=True)
    id_b, blocks_b = store(index, [1, 2, 3, 4, 9, 10, 11, 12], pinned=True)
    assert (blocks_a, blocks_b) == ([0, 1], [2])  # b's first block was cached already
    assert id_a is not None and id_b is not None and id_a != id_b
    assert pool.info(0).pin_count == 2
    assert hit_ids(index, [1, 2, 3, 4]) == [0]
    assert [s.num_hits for s in index.list_pinned()] == [1, 1]
    assert index.unpin(id_a)
    assert (pool.info(0).pin_count, pool.info(1).pin_count, pool.num_pinned_blocks) == (1, 0, 2)


def test_pinned_blocks_survive_lru_pressure_until_the_mark_then_least_used_goes_first() -> None:
    pool = BlockPool(num_blocks=10, block_size=2, high_water=0.9)
    index = SegmentIndex(pool, model_id="m")
    seg_a, seg_b, seg_c, seg_x = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [20, 21, 22, 23]
    id_a, _ = store(index, seg_a, pinned=True)  # blocks 0, 1
    id_b, _ = store(index, seg_b, pinned=True)  # blocks 2, 3
    id_c, _ = store(index, seg_c, pinned=True)  # blocks 4, 5
    store(index, seg_x)  # blocks 6, 7, unpinned: LRU 7, 6; empty 8, 9
    for seg in (seg_a, seg_a, seg_c):
        hit_ids(index, seg)
    held = pool.allocate(3)  # 9 used = the mark: the LRU gives up X's block, no pin is dropped
    assert held == [8, 9, 7]
    assert [s.segment_id for s in index.list_pinned()] == [id_a, id_b, id_c]
    assert pool.allocate(1) == [6]  # past the mark: B (no hits) is unpinned first
    assert [s.segment_id for s in index.list_pinned()] == [id_a, id_c]
    assert pool.allocate(1) == [3]  # at the mark again: plain LRU, B's blocks are the oldest
    assert pool.allocate(1) == [2]  # past the mark: C (1 hit) goes before A (2 hits)
    assert [s.segment_id for s in index.list_pinned()] == [id_a]
    assert hit_ids(index, seg_c) == [4, 5]  # unpinned, still cached


def test_pressure_ties_on_hits_drop_the_least_recently_used_segment() -> None:
    pool = BlockPool(num_blocks=4, block_size=1, high_water=0.5)
    index = SegmentIndex(pool, model_id="m")
    id_p, _ = store(index, [1], pinned=True)
    id_q, _ = store(index, [2], pinned=True)
    hit_ids(index, [2])
    hit_ids(index, [1])  # equal hits; Q's last use is older
    assert pool.allocate(1) == [2]
    assert [s.segment_id for s in index.list_pinned()] == [id_p]


def test_steady_stream_of_new_segments_stays_bounded_while_warm_pinned_segments_hit() -> None:
    pool = BlockPool(num_blocks=32, block_size=4, high_water=0.75)
    index = SegmentIndex(pool, model_id="m")
    warm = [[1000 * w + t for t in range(8)] for w in (1, 2, 3)]
    warm_ids = [store(index, seg, pinned=True)[0] for seg in warm]
    for step in range(200):
        fresh = [10_000 + 12 * step + t for t in range(12)]
        assert hit_ids(index, fresh) == []
        request = pool.allocate(4)  # a running request's own blocks
        store(index, fresh, start_pos=7)
        pool.release(request)
        for seg in warm:
            assert len(hit_ids(index, seg)) == 2
        assert pool.num_used_blocks == 6  # only the pinned blocks stay in use
        assert pool.num_cached_blocks <= pool.num_blocks
    assert [s.segment_id for s in index.list_pinned()] == warm_ids
    assert [s.num_hits for s in index.list_pinned()] == [200, 200, 200]
    assert hit_ids(index, [10_000 + t for t in range(12)]) == []  # early stream segments were evicted
    assert len(hit_ids(index, [10_000 + 12 * 199 + t for t in range(12)])) == 3  # the latest is cached
