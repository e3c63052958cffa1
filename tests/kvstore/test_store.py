"""TieredStore: tiers asked in order, promotion targets, fall-through past a bad copy, metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY, CollectorRegistry

from sparsex.kvstore import (
    BackgroundWriter,
    DiskTier,
    RedisTier,
    StoreMetrics,
    TieredStore,
    encode_entry,
    entry_key,
)
from tests.kvstore.conftest import RedisServer
from tests.kvstore.test_codec import expect_of, make_entry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_lookup_order_and_promotion(tmp_path: Path, redis_server: RedisServer, registry: CollectorRegistry) -> None:
    metrics = StoreMetrics(registry)
    disk = DiskTier(tmp_path, max_bytes=1 << 20, metrics=metrics)
    store = TieredStore([disk, RedisTier(redis_server.url, metrics=metrics)], metrics)
    entry = make_entry()
    key = entry_key(entry.fingerprint, entry.namespace, entry.content_hash)
    value = encode_entry(entry, "bfloat16")
    assert store.put(key, value, tiers=["redis"]) == ("redis",)  # e.g. written by another replica
    assert store.contains(key) == ("redis",)

    hit = store.get(key)
    assert hit is not None and (hit.tier, hit.missed) == ("redis", ("disk",))
    with BackgroundWriter(store) as writer:  # promote into the faster tiers, off the request path
        writer.submit(key, hit.value, tiers=hit.missed)
    assert store.contains(key) == ("disk", "redis")

    loaded = store.load(key, expect_of(entry))
    assert loaded is not None and (loaded.tier, loaded.missed) == ("disk", ())
    assert torch.equal(loaded.entry.keys, entry.keys.to(torch.bfloat16))
    assert sample(registry, "sparsex_kvstore_hits_total", tier="redis") == 1
    assert sample(registry, "sparsex_kvstore_hits_total", tier="disk") == 1
    assert sample(registry, "sparsex_kvstore_read_bytes_total", tier="disk") == len(value)
    assert sample(registry, "sparsex_kvstore_written_bytes_total", tier="disk") == len(value)
    assert sample(registry, "sparsex_kvstore_load_seconds_count", tier="disk") == 1

    other = make_entry(seed=5)
    assert store.get(entry_key(other.fingerprint, "nobody", other.content_hash)) is None
    assert sample(registry, "sparsex_kvstore_misses_total") == 1
    store.close()


def test_bad_copy_in_a_fast_tier_falls_through(tmp_path: Path, registry: CollectorRegistry) -> None:
    metrics = StoreMetrics(registry)
    fast = DiskTier(tmp_path / "fast", max_bytes=1 << 20, metrics=metrics, name="fast")
    slow = DiskTier(tmp_path / "slow", max_bytes=1 << 20, metrics=metrics, name="slow")
    store = TieredStore([fast, slow], metrics)
    entry = make_entry()
    key = entry_key(entry.fingerprint, entry.namespace, entry.content_hash)
    good = encode_entry(entry)
    store.put(key, good)
    fast.put(key, good[:-1] + bytes([good[-1] ^ 1]))  # a flipped checksum byte on the local disk

    loaded = store.load(key, expect_of(entry))
    assert loaded is not None and (loaded.tier, loaded.missed) == ("slow", ("fast",))
    assert not fast.contains(key)  # the bad copy is gone
    assert sample(registry, "sparsex_kvstore_rejected_entries_total", tier="fast") == 1


def test_disk_tier_spills_and_comes_back_after_restart(tmp_path: Path, registry: CollectorRegistry) -> None:
    entries = [make_entry(seed=i) for i in range(3)]
    keys = [entry_key(e.fingerprint, e.namespace, f"{i:02x}") for i, e in enumerate(entries)]
    values = [encode_entry(e) for e in entries]
    budget = 2 * len(values[0])  # room for two
    with TieredStore([DiskTier(tmp_path, budget)], StoreMetrics(registry)) as store:
        for key, value in zip(keys, values, strict=True):
            store.put(key, value)
    with TieredStore([DiskTier(tmp_path, budget)], StoreMetrics(registry)) as store:  # a new process
        assert store.get(keys[0]) is None  # the oldest spilled entry was evicted
        assert [store.get(k) is not None for k in keys[1:]] == [True, True]
        hit = store.get(keys[2])
        assert hit is not None and hit.value == values[2] and hit.tier == "disk"


def test_many_stores_share_the_default_registry(tmp_path: Path) -> None:
    stores = [TieredStore([DiskTier(tmp_path / str(i), 100)]) for i in range(3)]  # no duplicate errors
    for store in stores:
        store.get("missing")
    assert REGISTRY.get_sample_value("sparsex_kvstore_misses_total") is not None


def test_tier_names_must_be_unique(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        TieredStore([DiskTier(tmp_path / "a", 100), DiskTier(tmp_path / "b", 100)])
