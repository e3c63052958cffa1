"""Prometheus metrics of the KV store (hits, bytes, load latency, write queue, drops, errors).

Every metric is registered once per ``CollectorRegistry`` and shared by all stores, tiers and
writers that report to that registry: a process may build many stores (tests do) without
"Duplicated timeseries" errors, and the sums are what a scrape should show anyway. Pass a fresh
registry to read one store's numbers in isolation.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class _Families:
    hits: Counter
    misses: Counter
    read_bytes: Counter
    written_bytes: Counter
    load_seconds: Histogram
    rejected: Counter
    errors: Counter
    queue_depth: Gauge
    dropped_writes: Counter


_LOCK = threading.Lock()
_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()


def _families(registry: CollectorRegistry) -> _Families:
    with _LOCK:
        found = _BY_REGISTRY.get(registry)
        if found is None:
            r = registry
            found = _Families(
                hits=Counter("sparsex_kvstore_hits", "Lookups answered by a tier", ["tier"], registry=r),
                misses=Counter("sparsex_kvstore_misses", "Lookups no tier could answer", registry=r),
                read_bytes=Counter("sparsex_kvstore_read_bytes", "Bytes loaded from a tier", ["tier"],
                                   registry=r),
                written_bytes=Counter("sparsex_kvstore_written_bytes", "Bytes stored in a tier", ["tier"],
                                      registry=r),
                load_seconds=Histogram("sparsex_kvstore_load_seconds", "Time to read a hit from a tier",
                                       ["tier"], buckets=_LATENCY_BUCKETS, registry=r),
                rejected=Counter("sparsex_kvstore_rejected_entries",
                                 "Values that failed verification (corrupt or mismatched)", ["tier"],
                                 registry=r),
                errors=Counter("sparsex_kvstore_errors",
                               "Tier operations that failed or were skipped while the tier was down",
                               ["tier", "op"], registry=r),
                queue_depth=Gauge("sparsex_kvstore_write_queue_depth", "Writes waiting for the writer",
                                  registry=r),
                dropped_writes=Counter("sparsex_kvstore_dropped_writes", "Writes dropped, not stored",
                                       ["reason"], registry=r),
            )
            _BY_REGISTRY[registry] = found
        return found


class StoreMetrics:
    """Recording side of the metrics; one instance may be shared, or each object makes its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = REGISTRY if registry is None else registry
        self._f = _families(self.registry)

    def hit(self, tier: str, num_bytes: int, seconds: float) -> None:
        self._f.hits.labels(tier).inc()
        self._f.read_bytes.labels(tier).inc(num_bytes)
        self._f.load_seconds.labels(tier).observe(seconds)

    def miss(self) -> None:
        self._f.misses.inc()

    def written(self, tier: str, num_bytes: int) -> None:
        self._f.written_bytes.labels(tier).inc(num_bytes)

    def rejected(self, tier: str) -> None:
        self._f.rejected.labels(tier).inc()

    def error(self, tier: str, op: str) -> None:
        self._f.errors.labels(tier, op).inc()

    def queued(self, delta: int) -> None:
        # inc/dec rather than set: several writers in one process add up instead of overwriting
        self._f.queue_depth.inc(delta)

    def dropped(self, reason: str) -> None:
        self._f.dropped_writes.labels(reason).inc()


class _StoreFamilies:
    """A registry view with only the store's families (a collector source for ``generate_latest``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        return (m for m in self.registry.collect() if m.name.startswith("sparsex_kvstore_"))


def store_exposition(registry: CollectorRegistry | None = None) -> bytes:
    """The store's metrics in the Prometheus text format (default: the global registry), for a server
    that keeps its own registry and appends these to its ``/metrics``."""
    return bytes(generate_latest(_StoreFamilies(REGISTRY if registry is None else registry)))
