"""DiskTier: files per entry, LRU eviction within the byte budget, reopening restores the index."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry

from sparsex.kvstore import DiskTier, StoreMetrics


def val(n: int, fill: int = 0) -> bytes:
    return bytes([fill]) * n


def test_put_get_delete(tmp_path: Path, metrics: StoreMetrics) -> None:
    disk = DiskTier(tmp_path, max_bytes=1000, metrics=metrics)
    assert disk.get("sparsex:{a.b}:01") is None
    assert disk.put("sparsex:{a.b}:01", val(100, 1))
    assert disk.get("sparsex:{a.b}:01") == val(100, 1)
    assert disk.contains("sparsex:{a.b}:01") and disk.num_bytes == 100
    assert disk.put("sparsex:{a.b}:01", val(30, 2))  # overwrite
    assert disk.get("sparsex:{a.b}:01") == val(30, 2) and disk.num_bytes == 30
    disk.delete("sparsex:{a.b}:01")
    assert disk.get("sparsex:{a.b}:01") is None and disk.num_bytes == 0
    assert list(tmp_path.iterdir()) == []


def test_evicts_least_recently_used_within_budget(tmp_path: Path, metrics: StoreMetrics) -> None:
    disk = DiskTier(tmp_path, max_bytes=300, metrics=metrics)
    for k in "abc":
        assert disk.put(k, val(100))
    assert disk.get("a") is not None  # a is now the most recently used: b is the LRU
    assert disk.put("d", val(100))
    assert disk.keys() == ["c", "a", "d"]
    assert disk.num_bytes == 300
    assert disk.get("b") is None
    assert disk.put("e", val(250))  # needs room for 250: evicts c, a, d in LRU order
    assert disk.keys() == ["e"] and disk.num_bytes == 250
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.kv"]


def test_value_larger_than_budget_is_not_stored(tmp_path: Path, metrics: StoreMetrics) -> None:
    disk = DiskTier(tmp_path, max_bytes=100, metrics=metrics)
    assert disk.put("a", val(50))
    assert not disk.put("big", val(101))
    assert disk.keys() == ["a"]


def test_survives_reopen_with_lru_order(tmp_path: Path, metrics: StoreMetrics) -> None:
    disk = DiskTier(tmp_path, max_bytes=1000, metrics=metrics)
    for i, k in enumerate(["sparsex:{x.y}:aa", "sparsex:{x.y}:bb", "sparsex:{x.y}:cc"]):
        assert disk.put(k, val(100, i))
        os.utime(disk._file(k), (1000 + i, 1000 + i))  # distinct mtimes: no clock-resolution ties
    assert disk.get("sparsex:{x.y}:aa") is not None  # touched: most recent
    disk.close()
    (tmp_path / ".half-written.kv.123.456.tmp").write_bytes(b"partial")  # a crash mid-write

    reopened = DiskTier(tmp_path, max_bytes=1000, metrics=metrics)
    assert reopened.keys() == ["sparsex:{x.y}:bb", "sparsex:{x.y}:cc", "sparsex:{x.y}:aa"]
    assert reopened.num_bytes == 300
    assert reopened.get("sparsex:{x.y}:bb") == val(100, 1)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())

    smaller = DiskTier(tmp_path, max_bytes=150, metrics=metrics)  # a smaller budget evicts at start
    assert smaller.keys() == ["sparsex:{x.y}:bb"]
    assert len(list(tmp_path.iterdir())) == 1


def test_file_removed_behind_its_back_is_a_miss(tmp_path: Path, metrics: StoreMetrics) -> None:
    disk = DiskTier(tmp_path, max_bytes=1000, metrics=metrics)
    disk.put("a", val(10))
    disk._file("a").unlink()
    assert disk.get("a") is None
    assert disk.keys() == [] and disk.num_bytes == 0


def test_write_failure_is_counted_not_raised(tmp_path: Path, registry: CollectorRegistry) -> None:
    disk = DiskTier(tmp_path / "store", max_bytes=1000, metrics=StoreMetrics(registry))
    (tmp_path / "store").rmdir()  # the folder vanished: the write cannot happen
    assert not disk.put("a", val(10))
    assert disk.get("a") is None
    assert registry.get_sample_value("sparsex_kvstore_errors_total", {"tier": "disk", "op": "put"}) == 1
