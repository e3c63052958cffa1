"""EventBuilder on hand-made cache and store news: what each change announces, per medium."""

from __future__ import annotations

from sparsex.cache.listener import StoredBlocks
from sparsex.kvevents import (
    MEDIUM_DISK,
    MEDIUM_POOL,
    MEDIUM_REDIS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
)
from sparsex.kvevents.builder import EventBuilder
from sparsex.kvevents.hashing import BlockHasher
from tests.kvevents.subscriber import segment_hashes, vllm_prefix_hashes

B = 4


def builder(**kw: object) -> EventBuilder:
    return EventBuilder(B, BlockHasher("vllm-none-hash"), **kw)  # type: ignore[arg-type]


def seg(tokens: list[int], blocks: list[tuple[int, int]], ns: str = "") -> StoredBlocks:
    return StoredBlocks("segment", ns, tuple(tokens), tuple(blocks))


def test_prefix_runs_name_their_parent() -> None:
    b = builder()
    tokens = list(range(100, 120))  # 5 blocks
    chain = vllm_prefix_hashes(tokens, B)
    events = b.stored(StoredBlocks("prefix", "", tuple(tokens), ((0, 7), (1, 8), (3, 9), (4, 2))))
    assert [(e.block_hashes, e.parent_block_hash, e.token_ids) for e in events] == [  # type: ignore[union-attr]
        (chain[0:2], None, tokens[0:8]), (chain[3:5], chain[2], tokens[12:20])]
    assert all(e.medium == MEDIUM_POOL and e.extra_keys is None for e in events)  # type: ignore[union-attr]
    assert b.removed(9) == [BlockRemoved([chain[3]], MEDIUM_POOL)]
    assert b.removed(9) == []  # told once


def test_a_segments_partial_block_is_not_announced() -> None:
    b = builder()
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    (event,) = b.stored(seg(tokens, [(0, 1), (1, 2), (2, 3)]))
    assert isinstance(event, BlockStored) and event.block_hashes == segment_hashes(tokens, B)
    assert event.extra_keys == [("sparsex:segment",)] * 2
    assert b.removed(3) == []


def test_a_block_cached_twice_is_announced_once_and_removed_with_its_last_copy() -> None:
    b = builder()
    shared = [1, 2, 3, 4]
    first = b.stored(seg(shared + [5, 6, 7, 8], [(0, 10), (1, 11)]))
    second = b.stored(seg([9, 9, 9, 9] + shared, [(0, 12), (1, 13)]))
    h = segment_hashes(shared, B)[0]
    assert h in first[0].block_hashes and h not in second[0].block_hashes  # type: ignore[union-attr]
    assert second[0].token_ids == [9, 9, 9, 9]  # type: ignore[union-attr]
    assert b.removed(10) == []  # block 13 still holds it
    assert b.removed(13) == [BlockRemoved([h], MEDIUM_POOL)]


def test_a_reused_block_id_whose_removal_was_lost_is_removed_first() -> None:
    b = builder()
    b.stored(seg([1, 2, 3, 4], [(0, 5)]))
    old = segment_hashes([1, 2, 3, 4], B)[0]
    events = b.stored(seg([6, 7, 8, 9], [(0, 5)]))  # block 5 reallocated; its eviction never arrived
    assert events[0] == BlockRemoved([old], MEDIUM_POOL) and isinstance(events[1], BlockStored)


def test_a_namespace_hides_token_ids_unless_published_by_choice() -> None:
    tokens = [1, 2, 3, 4]
    (hidden,) = builder().stored(seg(tokens, [(0, 1)], ns="alice/"))
    assert hidden.token_ids == [] and hidden.block_hashes == segment_hashes(tokens, B, namespace="alice/")  # type: ignore[union-attr]
    (shown,) = builder(publish_token_ids=True).stored(seg(tokens, [(0, 1)], ns="alice/"))
    assert shown.token_ids == tokens  # type: ignore[union-attr]


def test_store_entries_per_tier() -> None:
    b = builder()
    tokens = list(range(50, 60))  # 2 full blocks
    hashes = segment_hashes(tokens, B)
    assert b.entry_stored("k", "disk") == []  # not an entry (an index record, the manifest)
    assert b.entry("k", "", tokens) == []
    (disk,) = b.entry_stored("k", "disk")
    assert (disk.medium, disk.block_hashes, disk.token_ids) == (MEDIUM_DISK, hashes, tokens[:8])  # type: ignore[union-attr]
    assert b.entry_stored("k", "disk") == []
    (redis,) = b.entry_stored("k", "redis")
    assert redis.medium == MEDIUM_REDIS  # type: ignore[union-attr]
    assert b.entry_removed("k", "disk") == [BlockRemoved(hashes, MEDIUM_DISK)]
    assert b.entry_removed("k", "disk") == []
    assert b.entry_removed("other", "redis") == []


def test_forgotten_entries_are_announced_removed() -> None:
    b = builder(max_entries=1)
    b.entry("a", "", [1, 2, 3, 4])
    b.entry_stored("a", "redis")
    events = b.entry("b", "", [5, 6, 7, 8])
    assert events == [BlockRemoved(segment_hashes([1, 2, 3, 4], B), MEDIUM_REDIS)]


def test_cleared_forgets_everything() -> None:
    b = builder()
    b.stored(seg([1, 2, 3, 4], [(0, 1)]))
    assert b.cleared() == [AllBlocksCleared()]
    assert b.removed(1) == []
