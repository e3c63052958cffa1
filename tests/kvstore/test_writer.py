"""BackgroundWriter: never blocks, drops when full (counted), flushes on flush/close/with/exit."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry

from sparsex.kvstore import BackgroundWriter, DiskTier, StoreMetrics, TieredStore, encode_entry, entry_key
from tests.kvstore.test_codec import expect_of, make_entry


class BlockingTier:
    """A tier whose writes wait until the test opens the gate: a store slower than the requests."""

    def __init__(self, name: str = "slow") -> None:
        self.name = name
        self.gate = threading.Event()
        self.started = threading.Event()
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def put(self, key: str, value: bytes) -> bool:
        self.started.set()
        assert self.gate.wait(timeout=10), "test never opened the gate"
        self.data[key] = value
        return True

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    def contains(self, key: str) -> bool:
        return key in self.data

    def close(self) -> None:
        pass


def depth(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("sparsex_kvstore_write_queue_depth")


def dropped(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("sparsex_kvstore_dropped_writes_total", {"reason": reason})


def test_full_queue_drops_instead_of_blocking(registry: CollectorRegistry) -> None:
    tier = BlockingTier()
    store = TieredStore([tier], StoreMetrics(registry))
    writer = BackgroundWriter(store, max_pending=2)
    assert writer.submit("k0", b"0")
    assert tier.started.wait(timeout=5)  # the thread holds k0, stuck in the slow tier
    assert writer.submit("k1", b"1") and writer.submit("k2", b"2")  # the queue is now full
    assert depth(registry) == 2
    results = [writer.submit(f"k{i}", b"x") for i in range(3, 13)]  # each returns at once
    assert results == [False] * 10
    assert writer.num_dropped == 10 and dropped(registry, "queue_full") == 10
    assert writer.num_pending == 3
    assert not writer.flush(timeout=0.05)  # still stuck
    tier.gate.set()
    assert writer.flush(timeout=5)
    assert sorted(tier.data) == ["k0", "k1", "k2"]
    assert depth(registry) == 0
    writer.close()


def test_byte_bound_drops_large_backlog(registry: CollectorRegistry) -> None:
    tier = BlockingTier()
    writer = BackgroundWriter(TieredStore([tier], StoreMetrics(registry)), max_pending_bytes=100)
    assert writer.submit("k0", b"a" * 80)
    assert tier.started.wait(timeout=5)
    assert writer.submit("k1", b"b" * 80)  # an empty queue always takes one write
    assert not writer.submit("k2", b"c" * 80)  # 160 > 100 pending bytes
    tier.gate.set()
    writer.close()
    assert sorted(tier.data) == ["k0", "k1"]


def test_close_and_context_manager_flush(tmp_path: Path, registry: CollectorRegistry) -> None:
    disk = DiskTier(tmp_path, max_bytes=10_000, metrics=StoreMetrics(registry))
    store = TieredStore([disk], StoreMetrics(registry))
    with BackgroundWriter(store) as writer:
        for i in range(20):
            assert writer.submit(f"k{i}", bytes([i]) * 10)
    assert writer.num_written == 20 and disk.num_bytes == 200
    assert disk.get("k7") == bytes([7]) * 10
    assert not writer.submit("late", b"x")  # closed
    assert dropped(registry, "closed") == 1
    assert writer.close()  # idempotent


def test_close_gives_up_on_a_stuck_tier(registry: CollectorRegistry) -> None:
    tier = BlockingTier()
    writer = BackgroundWriter(TieredStore([tier], StoreMetrics(registry)))
    writer.submit("k0", b"0")
    assert tier.started.wait(timeout=5)
    writer.submit("k1", b"1")
    assert not writer.close(timeout=0.05)  # returns although k0 is still being written
    assert dropped(registry, "closed") == 1  # k1 abandoned
    tier.gate.set()


def test_submit_entry_encodes_in_the_thread(tmp_path: Path, registry: CollectorRegistry) -> None:
    entry = make_entry()
    key = entry_key(entry.fingerprint, entry.namespace, entry.content_hash)
    store = TieredStore([DiskTier(tmp_path, max_bytes=1 << 20)], StoreMetrics(registry))
    with BackgroundWriter(store) as writer:
        assert writer.submit_entry(key, entry, "float16")
    loaded = store.load(key, expect_of(entry))
    assert loaded is not None and loaded.value == encode_entry(entry, "float16")


def test_tier_selection(tmp_path: Path, registry: CollectorRegistry) -> None:
    a = DiskTier(tmp_path / "a", max_bytes=100, metrics=StoreMetrics(registry), name="a")
    b = DiskTier(tmp_path / "b", max_bytes=100, metrics=StoreMetrics(registry), name="b")
    with BackgroundWriter(TieredStore([a, b], StoreMetrics(registry))) as writer:
        writer.submit("only-b", b"v", tiers=("b",))
    assert not a.contains("only-b") and b.contains("only-b")


def test_process_exit_flushes_pending_writes(tmp_path: Path) -> None:
    code = f"""
import threading
from sparsex.kvstore import BackgroundWriter, DiskTier, TieredStore

class Slow(DiskTier):
    def put(self, key, value):
        threading.Event().wait(0.02)  # slower than the submits below
        return super().put(key, value)

writer = BackgroundWriter(TieredStore([Slow({str(tmp_path)!r}, max_bytes=10_000)]))
for i in range(10):
    assert writer.submit(f"k{{i}}", b"v" * 10)
# no close(): the atexit hook must flush
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert len(list(tmp_path.glob("*.kv"))) == 10
