"""BlockPool: exact block ids, LRU order, refcounts, pinning and the high-water mark."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsex.cache import BlockHash, BlockPool, NoFreeBlocksError, blocks_for_budget, hash_block

SALT = ("test-model", "", "prefix")


def h(*token_ids: int) -> BlockHash:
    return hash_block(None, token_ids, SALT)


def publish(pool: BlockPool, block_id: int, *token_ids: int) -> None:
    assert pool.register(block_id, h(*token_ids), token_ids, position=0) == block_id


def test_allocate_takes_never_used_blocks_in_order() -> None:
    pool = BlockPool(num_blocks=4, block_size=2)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(0) == []
    assert pool.allocate(1) == [3]
    assert (pool.num_free_blocks, pool.num_used_blocks, pool.usage) == (0, 4, 1.0)


def test_allocation_is_all_or_nothing() -> None:
    pool = BlockPool(num_blocks=4, block_size=2)
    pool.allocate(3)
    with pytest.raises(NoFreeBlocksError, match="cannot allocate 2 KV blocks: only 1 of 4"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    assert pool.allocate(1) == [3]
    with pytest.raises(ValueError, match="negative"):
        pool.allocate(-1)


def test_lru_evicts_least_recently_freed_cached_block_and_drops_its_hash() -> None:
    pool = BlockPool(num_blocks=4, block_size=2)
    assert pool.allocate(4) == [0, 1, 2, 3]
    for block_id in range(4):
        publish(pool, block_id, 10 * block_id, 10 * block_id + 1)
    pool.release([0])
    pool.release([2])
    pool.release([1, 3])  # table order; joins the LRU reversed: 3 then 1
    assert pool.num_cached_blocks == 4
    assert pool.allocate(1) == [0]
    assert pool.lookup(h(0, 1), [0, 1]) is None  # lazily evicted on reuse
    assert pool.num_cached_blocks == 3
    assert pool.allocate(2) == [2, 3]
    assert pool.lookup(h(10, 11), [10, 11]) == 1  # the most recently freed survives
    assert pool.allocate(1) == [1]
    assert pool.num_cached_blocks == 0


def test_empty_blocks_are_reused_before_cached_ones() -> None:
    pool = BlockPool(num_blocks=4, block_size=2)
    assert pool.allocate(2) == [0, 1]
    publish(pool, 0, 5, 6)
    pool.release([0, 1])  # 1 has no hash: back on top of the empty stack, above 2 and 3
    assert pool.allocate(3) == [1, 2, 3]
    assert pool.lookup(h(5, 6), [5, 6]) == 0
    assert pool.allocate(1) == [0]
    assert pool.lookup(h(5, 6), [5, 6]) is None


def test_incref_takes_a_cached_block_off_the_free_list() -> None:
    pool = BlockPool(num_blocks=3, block_size=2)
    assert pool.allocate(2) == [0, 1]
    publish(pool, 0, 1, 2)
    publish(pool, 1, 3, 4)
    pool.release([0, 1])  # LRU: 1, 0
    pool.incref([1])  # a hit on the LRU head
    info = pool.info(1)
    assert (info.ref_count, info.num_hits, pool.num_free_blocks) == (1, 1, 2)
    assert pool.allocate(2) == [2, 0]  # 1 is in use, so 0 is the only cached block to reuse
    pool.release([1])
    assert pool.allocate(1) == [1]


def test_refcounts_and_release_below_zero() -> None:
    pool = BlockPool(num_blocks=2, block_size=2)
    [block_id] = pool.allocate(1)
    publish(pool, block_id, 7, 8)
    pool.incref([block_id, block_id])
    assert pool.info(block_id).ref_count == 3
    with pytest.raises(ValueError, match="below zero"):
        pool.release([block_id] * 4)
    assert pool.info(block_id).ref_count == 3  # nothing released
    pool.release([block_id] * 3)
    assert pool.num_free_blocks == 2
    with pytest.raises(ValueError, match="below zero"):
        pool.release([block_id])
    with pytest.raises(ValueError, match="out of range"):
        pool.release([2])


def test_incref_of_an_empty_free_block_is_an_error() -> None:
    pool = BlockPool(num_blocks=2, block_size=2)
    with pytest.raises(ValueError, match="holds nothing"):
        pool.incref([0])
    with pytest.raises(ValueError, match="holds nothing"):
        pool.pin([0])


def test_register_first_writer_wins_and_collisions_stay_unpublished() -> None:
    pool = BlockPool(num_blocks=3, block_size=2)
    assert pool.allocate(3) == [0, 1, 2]
    publish(pool, 0, 1, 2)
    assert pool.register(1, h(1, 2), [1, 2], position=8) == 0  # duplicate content: 0 serves it
    assert pool.info(1).block_hash is None
    assert pool.register(2, h(1, 2), [9, 9], position=0) == 2  # collision: 2 is not published
    assert pool.info(2).block_hash is None
    assert pool.lookup(h(1, 2), [1, 2]) == 0
    assert pool.lookup(h(1, 2), [9, 9]) is None  # never serve wrong KV
    assert pool.register(0, h(1, 2), [1, 2], position=0) == 0  # idempotent
    with pytest.raises(ValueError, match="already published"):
        pool.register(0, h(3, 4), [3, 4], position=0)
    with pytest.raises(ValueError, match="holds 1..2 tokens"):
        pool.register(1, h(1, 2, 3), [1, 2, 3], position=0)
    pool.release([1])
    with pytest.raises(ValueError, match="is free"):
        pool.register(1, h(5), [5], position=0)


def test_partial_block_keeps_its_tokens_and_position() -> None:
    pool = BlockPool(num_blocks=1, block_size=4)
    pool.allocate(1)
    assert pool.register(0, h(3), [3], position=37) == 0
    info = pool.info(0)
    assert (info.token_ids, info.position, info.block_hash) == ((3,), 37, h(3))


def test_pinned_blocks_are_never_evicted_and_pins_nest() -> None:
    pool = BlockPool(num_blocks=3, block_size=2, high_water=1.0)
    assert pool.allocate(3) == [0, 1, 2]
    for block_id in range(3):
        publish(pool, block_id, block_id, block_id)
    pool.pin([1])
    pool.pin([1])
    pool.release([0, 1, 2])
    assert (pool.num_pinned_blocks, pool.num_used_blocks, pool.num_cached_blocks) == (1, 1, 3)
    assert pool.allocate(2) == [2, 0]
    with pytest.raises(NoFreeBlocksError, match="1 pinned"):
        pool.allocate(1)
    pool.unpin([1])
    assert pool.num_pinned_blocks == 1  # still pinned once
    pool.unpin([1])
    assert pool.num_pinned_blocks == 0
    assert pool.lookup(h(1, 1), [1, 1]) == 1  # unpinned, but still cached in the LRU
    with pytest.raises(ValueError, match="not pinned"):
        pool.unpin([1])
    assert pool.allocate(1) == [1]


def test_pin_takes_a_free_cached_block_off_the_lru() -> None:
    pool = BlockPool(num_blocks=2, block_size=2, high_water=1.0)
    pool.allocate(1)
    publish(pool, 0, 4, 4)
    pool.release([0])
    pool.pin([0])
    assert pool.num_free_blocks == 1
    assert pool.allocate(1) == [1]
    pool.unpin([0])
    assert pool.allocate(1) == [0]


class HookSpy:
    def __init__(self, pool: BlockPool, unpin: Sequence[int] = ()) -> None:
        self.pool = pool
        self.calls: list[int] = []
        self.to_unpin = list(unpin)

    def __call__(self, num_blocks: int) -> None:
        self.calls.append(num_blocks)
        if self.to_unpin:
            self.pool.unpin(self.to_unpin)
            self.to_unpin = []


def test_pressure_hook_fires_only_past_the_high_water_mark() -> None:
    pool = BlockPool(num_blocks=10, block_size=2, high_water=0.8)
    assert pool.high_water_blocks == 8
    assert pool.allocate(2) == [0, 1]
    publish(pool, 0, 0, 0)
    publish(pool, 1, 1, 1)
    pool.pin([0, 1])
    pool.release([0, 1])
    spy = HookSpy(pool, unpin=[0, 1])
    pool.set_pressure_hook(spy)
    assert pool.allocate(6) == [2, 3, 4, 5, 6, 7]  # 8 used: at the mark, not past it
    assert spy.calls == []
    assert pool.allocate(1) == [8]  # 9 > 8: the hook is asked for 1 block
    assert spy.calls == [1]
    assert pool.num_pinned_blocks == 0
    assert pool.lookup(h(0, 0), [0, 0]) == 0  # unpinned blocks stay hittable until reused
    assert pool.allocate(2) == [9, 1]  # hook not called: nothing pinned any more
    assert spy.calls == [1]


def test_pressure_hook_is_asked_for_the_shortfall_when_allocation_cannot_be_served() -> None:
    pool = BlockPool(num_blocks=4, block_size=2, high_water=1.0)
    pool.allocate(2)
    publish(pool, 0, 0, 0)
    publish(pool, 1, 1, 1)
    pool.pin([0, 1])
    pool.release([0, 1])
    spy = HookSpy(pool)  # unpins nothing
    pool.set_pressure_hook(spy)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(3)
    assert spy.calls == [1]
    assert pool.num_free_blocks == 2  # all or nothing
    with pytest.raises(ValueError, match="already has a pressure hook"):
        pool.set_pressure_hook(HookSpy(pool))
    pool.set_pressure_hook(None)


def test_evict_hook_hears_of_every_dropped_hash_while_it_is_still_published() -> None:
    pool = BlockPool(num_blocks=3, block_size=2)
    heard: list[tuple[int, bool]] = []
    pool.set_evict_hook(lambda block_id: heard.append((block_id, pool.info(block_id).block_hash is not None)))
    assert pool.allocate(3) == [0, 1, 2]
    publish(pool, 0, 1, 2)
    publish(pool, 1, 3, 4)
    pool.release([0, 1, 2])  # 2 holds nothing: back on the empty stack, never "evicted"
    assert pool.allocate(2) == [2, 1]
    assert heard == [(1, True)]
    assert pool.clear_cached() == 1
    assert heard == [(1, True), (0, True)]
    with pytest.raises(ValueError, match="already has an evict hook"):
        pool.set_evict_hook(lambda block_id: None)
    pool.set_evict_hook(None)


def test_clear_cached_evicts_only_free_cached_blocks() -> None:
    pool = BlockPool(num_blocks=3, block_size=1)
    pool.allocate(3)
    for block_id in range(3):
        publish(pool, block_id, block_id)
    pool.release([0, 1])
    assert pool.clear_cached() == 2
    assert (pool.num_cached_blocks, pool.lookup(h(2), [2])) == (1, 2)
    assert pool.allocate(2) == [0, 1]  # evicted blocks go on the empty stack, 0 last (on top)


@pytest.mark.parametrize(
    ("num_blocks", "block_size", "high_water", "message"),
    [
        (0, 4, 0.9, "num_blocks"),
        (4, 0, 0.9, "block_size"),
        (4, 4, 0.0, "high_water"),
        (4, 4, 1.5, "high_water"),
    ],
)
def test_constructor_validates(num_blocks: int, block_size: int, high_water: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BlockPool(num_blocks, block_size, high_water)


def test_blocks_for_budget() -> None:
    assert blocks_for_budget(bytes_per_block=100, budget=1050, available_bytes=10_000) == 10
    assert blocks_for_budget(bytes_per_block=100, budget=0.5, available_bytes=10_000) == 50
    assert blocks_for_budget(bytes_per_block=100, budget=1.0, available_bytes=10_000) == 100
    for bad_budget, message in [
        (0, "must be >= 1"),
        (20_000, "exceeds"),
        (0.0, r"in \(0, 1\]"),
        (1.5, r"in \(0, 1\]"),
        (True, "bytes"),
        (50, "holds no KV block"),
        (0.001, "holds no KV block"),
    ]:
        with pytest.raises(ValueError, match=message):
            blocks_for_budget(bytes_per_block=100, budget=bad_budget, available_bytes=10_000)
    with pytest.raises(ValueError, match="bytes_per_block"):
        blocks_for_budget(bytes_per_block=0, budget=10, available_bytes=10)


ops = st.lists(
    st.tuples(
        st.sampled_from(["allocate", "release", "incref", "pin", "unpin", "register"]), st.integers(0, 5)
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None, database=None)
@given(ops)
def test_random_operations_keep_the_invariants(operations: list[tuple[str, int]]) -> None:
    """Against a model: free = unreferenced and unpinned; every published block is found by lookup."""
    pool = BlockPool(num_blocks=6, block_size=1, high_water=1.0)
    refs = [0] * 6
    pins = [0] * 6

    def num_free() -> int:
        return sum(1 for r, p in zip(refs, pins, strict=True) if r == 0 and p == 0)

    for op, arg in operations:
        block_id = arg
        if op == "allocate":
            n = arg % 3
            if n <= num_free():
                for allocated in pool.allocate(n):
                    assert refs[allocated] == 0 and pins[allocated] == 0
                    refs[allocated] = 1
        elif op == "release" and refs[block_id] > 0:
            pool.release([block_id])
            refs[block_id] -= 1
        elif op == "incref" and (refs[block_id] > 0 or pins[block_id] > 0 or pool.info(block_id).block_hash):
            pool.incref([block_id])
            refs[block_id] += 1
        elif op == "pin" and (refs[block_id] > 0 or pins[block_id] > 0 or pool.info(block_id).block_hash):
            pool.pin([block_id])
            pins[block_id] += 1
        elif op == "unpin" and pins[block_id] > 0:
            pool.unpin([block_id])
            pins[block_id] -= 1
        elif op == "register" and (refs[block_id] > 0 or pins[block_id] > 0):
            if pool.info(block_id).block_hash is None:
                pool.register(block_id, h(block_id), [block_id], position=block_id)
        infos = [pool.info(i) for i in range(6)]
        assert [i.ref_count for i in infos] == refs
        assert [i.pin_count for i in infos] == pins
        assert pool.num_free_blocks == num_free()
        assert pool.num_pinned_blocks == sum(1 for p in pins if p > 0)
        for info in infos:
            if info.block_hash is not None:
                assert pool.lookup(info.block_hash, info.token_ids) == info.block_id
        assert pool.num_cached_blocks == sum(1 for i in infos if i.block_hash is not None)
