"""RedisTier against a real redis-server: sharing, isolation, corruption, crash, restart, pause, full."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
import redis
import torch
from prometheus_client import CollectorRegistry

from sparsex.kvstore import (
    BackgroundWriter,
    EntryExpectation,
    RedisTier,
    StoreMetrics,
    TieredStore,
    encode_entry,
    entry_key,
)
from tests.kvstore.conftest import RedisServer
from tests.kvstore.test_codec import FP, expect_of, make_entry

LOGGER = "sparsex.kvstore"


def errors(registry: CollectorRegistry, op: str) -> float:
    return registry.get_sample_value("sparsex_kvstore_errors_total", {"tier": "redis", "op": op}) or 0.0


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def wait_until(condition: Callable[[], bool], attempts: int = 200, pause_s: float = 0.02) -> bool:
    """Poll a bounded number of times (the tier's backoff in these tests is <= 0.1 s)."""
    for _ in range(attempts):
        if condition():
            return True
        time.sleep(pause_s)
    return False


def test_put_get_contains_delete(redis_server: RedisServer, metrics: StoreMetrics) -> None:
    tier = RedisTier(redis_server.url, metrics=metrics)
    key = entry_key(FP, "ns", "0a")
    assert tier.get(key) is None and not tier.contains(key)
    assert tier.put(key, b"\x00value\xff")
    assert tier.get(key) == b"\x00value\xff" and tier.contains(key)
    tier.delete(key)
    assert tier.get(key) is None
    tier.close()


def test_entry_written_by_one_replica_loads_bitwise_in_another(
    redis_server: RedisServer, registry: CollectorRegistry
) -> None:
    entry = make_entry()
    key = entry_key(entry.fingerprint, entry.namespace, entry.content_hash)
    replica_a = TieredStore([RedisTier(redis_server.url)], StoreMetrics(registry))
    with BackgroundWriter(replica_a) as writer:
        assert writer.submit(key, encode_entry(entry, "float32"))
    replica_b = TieredStore([RedisTier(redis_server.url)], StoreMetrics(registry))
    loaded = replica_b.load(key, expect_of(entry))
    assert loaded is not None and loaded.tier == "redis"
    assert torch.equal(loaded.entry.keys, entry.keys)
    assert torch.equal(loaded.entry.values, entry.values)
    assert registry.get_sample_value("sparsex_kvstore_hits_total", {"tier": "redis"}) == 1
    assert registry.get_sample_value("sparsex_kvstore_read_bytes_total", {"tier": "redis"}) == len(loaded.value)
    replica_a.close()
    replica_b.close()


def test_namespaces_are_isolated(redis_server: RedisServer, metrics: StoreMetrics) -> None:
    store = TieredStore([RedisTier(redis_server.url, metrics=metrics)], metrics)
    a, b = make_entry("tenant-a", seed=1), make_entry("tenant-b", seed=2)
    key_a = entry_key(FP, "tenant-a", a.content_hash)
    key_b = entry_key(FP, "tenant-b", b.content_hash)
    assert key_a != key_b  # same content hash, different keys
    store.put(key_a, encode_entry(a))
    assert store.get(key_b) is None  # tenant b never sees tenant a's entry
    # even if a's value sat under b's key, b's load rejects it (namespace is inside the value)
    store.put(key_b, encode_entry(a))
    assert store.load(key_b, EntryExpectation(FP, "tenant-b", b.content_hash, b.token_ids)) is None
    loaded = store.load(key_a, expect_of(a))
    assert loaded is not None and loaded.entry.namespace == "tenant-a"
    store.close()


def test_corrupt_value_in_redis_is_rejected_and_removed(
    redis_server: RedisServer, registry: CollectorRegistry
) -> None:
    entry = make_entry()
    key = entry_key(FP, entry.namespace, entry.content_hash)
    store = TieredStore([RedisTier(redis_server.url)], StoreMetrics(registry))
    assert store.put(key, encode_entry(entry)) == ("redis",)
    raw = redis.Redis.from_url(redis_server.url)
    raw.setrange(key, 200, b"\xde\xad")  # someone else's bytes land in the middle of K
    assert store.load(key, expect_of(entry)) is None
    assert registry.get_sample_value("sparsex_kvstore_rejected_entries_total", {"tier": "redis"}) == 1
    assert registry.get_sample_value("sparsex_kvstore_misses_total") == 1
    assert raw.exists(key) == 0  # deleted: the recompute will write a good copy
    raw.set(key, encode_entry(entry)[:-10])  # truncated
    assert store.load(key, expect_of(entry)) is None
    raw.close()
    store.close()


def test_killed_server_is_a_miss_warned_once_then_reconnects(
    redis_server: RedisServer, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    tier = RedisTier(redis_server.url, retry_backoff_s=0.05, max_backoff_s=0.1,
                     metrics=StoreMetrics(registry))
    assert tier.put("k", b"before")
    redis_server.kill()
    for _ in range(5):
        assert tier.get("k") is None  # returns (a miss), does not raise
    assert not tier.put("k", b"during")
    assert tier.is_down
    assert errors(registry, "get") == 5 and errors(registry, "put") == 1
    time.sleep(0.12)  # past the backoff: the next call really tries, and fails again
    assert tier.get("k") is None
    assert len(warnings_of(caplog)) == 1

    redis_server.start()  # same port, empty (no persistence)
    assert wait_until(lambda: tier.put("k", b"after"))
    assert tier.get("k") == b"after" and not tier.is_down
    assert len(warnings_of(caplog)) == 1
    assert any("recovered" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)

    redis_server.kill()  # flapping: every new outage gets its own single warning
    assert all(tier.get("k") is None for _ in range(3))
    assert len(warnings_of(caplog)) == 2
    tier.close()


def test_paused_server_times_out_then_recovers(
    redis_server: RedisServer, registry: CollectorRegistry
) -> None:
    tier = RedisTier(redis_server.url, timeout_s=0.2, retry_backoff_s=0.05, max_backoff_s=0.1,
                     metrics=StoreMetrics(registry))
    assert tier.put("k", b"v")
    redis_server.pause()  # accepts connections, never answers
    try:
        assert tier.get("k") is None  # bounded by timeout_s, then a miss
        assert tier.is_down and errors(registry, "get") == 1
    finally:
        redis_server.resume()
    assert wait_until(lambda: tier.get("k") == b"v")
    tier.close()


def test_full_server_drops_writes_cleanly(
    redis_factory: Callable[..., RedisServer], registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_factory("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    tier = RedisTier(server.url, metrics=StoreMetrics(registry))
    value = b"x" * (256 * 1024)
    results = [tier.put(f"k{i}", value) for i in range(40)]
    assert results[0] and not all(results)  # the first fits, later ones hit OOM
    first_refused = results.index(False)
    assert not any(results[first_refused:])
    assert errors(registry, "put") == 40 - first_refused
    assert not tier.is_down  # reachable: reads go on
    assert tier.get("k0") == value
    assert len(warnings_of(caplog)) == 1 and "writes" in warnings_of(caplog)[0]
    tier.close()


def test_evicting_server_is_just_a_miss(
    redis_factory: Callable[..., RedisServer], registry: CollectorRegistry
) -> None:
    server = redis_factory("--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")
    tier = RedisTier(server.url, metrics=StoreMetrics(registry))
    value = b"y" * (256 * 1024)
    assert all(tier.put(f"k{i}", value) for i in range(20))
    assert tier.get("k0") is None  # evicted long ago
    assert tier.get("k19") == value
    assert errors(registry, "put") == 0
    tier.close()


def test_unreachable_url_never_raises(metrics: StoreMetrics) -> None:
    tier = RedisTier("redis://127.0.0.1:1/0", connect_timeout_s=0.1, metrics=metrics)
    assert tier.get("k") is None
    assert not tier.put("k", b"v")
    assert not tier.contains("k")
    tier.delete("k")
    tier.close()


def test_key_layout_on_a_cluster_node(
    redis_factory: Callable[..., RedisServer], metrics: StoreMetrics
) -> None:
    """A one-node Redis Cluster owning every slot: entries work, and one tenant's keys share a slot."""
    server = redis_factory("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    raw = redis.Redis.from_url(server.url)
    raw.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
    assert wait_until(lambda: b"cluster_state:ok" in raw.execute_command("CLUSTER", "INFO"))
    tier = RedisTier(server.url, metrics=metrics)
    same_tenant = [entry_key(FP, "tenant-a", h) for h in ("01", "02", "03")]
    for i, key in enumerate(same_tenant):
        assert tier.put(key, bytes([i]))
    assert tier.get(same_tenant[1]) == b"\x01"
    slots = {raw.execute_command("CLUSTER", "KEYSLOT", k) for k in same_tenant}
    assert len(slots) == 1
    assert raw.mget(same_tenant) == [b"\x00", b"\x01", b"\x02"]  # one round trip for a prompt's entries
    with pytest.raises(redis.ResponseError, match="same slot"):  # CROSSSLOT
        raw.mget([same_tenant[0], entry_key(FP, "tenant-b", "01")])
    raw.close()
    tier.close()
