"""PrefixCache: exact, verified, namespace-salted matching of leading full blocks."""

from __future__ import annotations

from sparsex.cache import BlockPool, PrefixCache, SegmentIndex


def collide(data: bytes) -> bytes:
    return b"x"


def run_request(cache: PrefixCache, token_ids: list[int], namespace: str = "") -> list[int]:
    """What the engine does: hit what it can, allocate the rest, publish, release."""
    block_size = cache.pool.block_size
    hit = cache.match(token_ids, namespace)
    num_blocks = -(-len(token_ids) // block_size)
    table = hit + cache.pool.allocate(num_blocks - len(hit))
    cache.register(token_ids, table, namespace, num_exact_tokens=len(token_ids))
    cache.pool.release(table)
    return table


def test_match_returns_the_registered_full_blocks_and_increfs_them() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    cache = PrefixCache(pool, model_id="m")
    prompt = list(range(10))  # two full blocks and a partial one
    assert run_request(cache, prompt) == [0, 1, 2]
    assert pool.num_cached_blocks == 2  # the partial tail is never published
    assert cache.match(prompt, "") == [0, 1]
    assert [pool.info(b).ref_count for b in (0, 1)] == [1, 1]
    assert cache.match(prompt[:7], "") == [0]
    assert cache.match([0, 1, 2, 3, 99, 5, 6, 7], "") == [0]  # diverges in block 1
    assert cache.match([99] + prompt[1:], "") == []
    assert pool.info(0).position == 0 and pool.info(1).position == 4


def test_register_publishes_only_blocks_with_exact_kv() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    cache = PrefixCache(pool, model_id="m")
    prompt = list(range(16))
    table = pool.allocate(4)
    assert cache.register(prompt, table, "", num_exact_tokens=7) == 1  # token 7 is not exact
    assert cache.register(prompt, table, "", num_exact_tokens=12) == 2  # block 0 already published
    assert cache.register(prompt, table, "", num_exact_tokens=12) == 0
    assert cache.match(prompt, "") == [0, 1, 2]


def test_duplicate_request_reuses_the_first_writers_blocks() -> None:
    pool = BlockPool(num_blocks=8, block_size=2)
    cache = PrefixCache(pool, model_id="m")
    prompt = [5, 6, 7, 8]
    first, second = pool.allocate(2), pool.allocate(2)  # two requests racing on the same prompt
    assert cache.register(prompt, first, "", 4) == 2
    assert cache.register(prompt, second, "", 4) == 0
    pool.release(first + second)
    assert cache.match(prompt, "") == first


def test_namespace_model_and_domain_isolation() -> None:
    pool = BlockPool(num_blocks=16, block_size=2)
    cache_a = PrefixCache(pool, model_id="model-a")
    cache_b = PrefixCache(pool, model_id="model-b")
    prompt = [1, 2, 3, 4]
    run_request(cache_a, prompt, namespace="tenant-1")
    assert cache_a.match(prompt, "tenant-2") == []
    assert cache_b.match(prompt, "tenant-1") == []
    segments = SegmentIndex(pool, model_id="model-a")
    assert segments.match(prompt, "tenant-1").block_ids == []  # segment entries are another domain
    assert cache_a.match(prompt, "tenant-1") == [0, 1]


def test_colliding_hash_never_serves_wrong_blocks() -> None:
    pool = BlockPool(num_blocks=8, block_size=2)
    cache = PrefixCache(pool, model_id="m", hash_fn=collide)
    assert run_request(cache, [1, 2, 3, 4]) == [0, 1]
    assert pool.num_cached_blocks == 1  # block 1's hash collides with block 0's: left unpublished
    assert cache.match([1, 2, 3, 4], "") == [0]
    assert cache.match([3, 4, 1, 2], "") == []  # same hash, other tokens
    assert cache.match([9, 9], "") == []


def test_released_requests_are_evicted_tail_first() -> None:
    pool = BlockPool(num_blocks=4, block_size=2)
    cache = PrefixCache(pool, model_id="m")
    prompt = list(range(8))
    assert run_request(cache, prompt) == [0, 1, 2, 3]
    assert pool.allocate(1) == [3]  # the chain's last block goes first
    assert cache.match(prompt, "") == [0, 1, 2]
    pool.release([0, 1, 2])
    assert pool.allocate(2) == [2, 1]
    assert cache.match(prompt, "") == [0]
