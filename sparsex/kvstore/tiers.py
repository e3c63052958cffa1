"""The tier interface and ``TieredStore``, which asks tiers in order (fastest first).

    TieredStore.get / load        first hit wins; `missed` names the faster tiers to promote into
      │
      ├─ DiskTier  (disk.py)      this machine, files, byte budget, LRU, survives restarts
      └─ RedisTier (redis_tier.py) shared by every replica, bounded timeouts, backs off when down

A tier stores opaque bytes under string keys (``keys.entry_key``); only ``load`` decodes them.
The in-pool cache sits above all of this, in the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from sparsex.kvstore.codec import EntryExpectation, EntryRejected, KVEntry, decode_entry
from sparsex.kvstore.metrics import StoreMetrics

log = logging.getLogger("sparsex.kvstore")


class Tier(Protocol):
    """A byte store. Faults (down, slow, full, disk errors) are never raised: a read that fails is a
    miss (None), a write that fails returns False, and the tier counts and logs it itself."""

    name: str
    """Label in metrics and in ``StoreHit.tier`` ("disk", "redis"); unique within a store."""

    def get(self, key: str) -> bytes | None: ...

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """``get`` of every key, in order, in as few round trips as the backend allows."""
        ...

    def put(self, key: str, value: bytes) -> bool: ...

    def delete(self, key: str) -> None: ...

    def contains(self, key: str) -> bool: ...

    def close(self) -> None: ...


class StoreListener(Protocol):
    """Told of every key a tier stored or dropped (e.g. the KV event publisher). Called from the
    thread that wrote or deleted (the background writer's, or the engine's); must not block."""

    def stored(self, key: str, tier: str) -> None: ...

    def removed(self, key: str, tier: str) -> None: ...


class FaultLog:
    """One warning when a tier starts failing, one info line when it works again (not one per call).

    Thread-safe enough for its job: a race can at worst log a transition twice.
    """

    def __init__(self, tier: str, what: str) -> None:
        self.tier = tier
        self.what = what
        self.failing = False

    def failed(self, err: BaseException | str) -> None:
        if not self.failing:
            self.failing = True
            log.warning("kv store: %s tier %s failing (%s); serving by recompute until it recovers",
                        self.tier, self.what, err)

    def succeeded(self) -> None:
        if self.failing:
            self.failing = False
            log.info("kv store: %s tier %s recovered", self.tier, self.what)


@dataclass(frozen=True)
class StoreHit:
    """Raw bytes found by ``TieredStore.get``."""

    value: bytes
    tier: str
    """The tier that answered."""
    missed: tuple[str, ...]
    """Faster tiers that did not have it: where a caller may promote the value."""
    seconds: float
    """Time the answering tier took."""


@dataclass(frozen=True)
class LoadedEntry:
    """A verified entry found by ``TieredStore.load``."""

    entry: KVEntry
    tier: str
    missed: tuple[str, ...]
    """Faster tiers that did not have a valid copy (rejected copies are deleted there)."""
    value: bytes
    """The encoded bytes, for promotion into ``missed`` without re-encoding."""
    seconds: float
    """Time the answering tier took to read it (decode excluded)."""


class TieredStore:
    """Tiers asked in order; a hit stops the search. Writes go to every tier (or the named ones).

    Invariant: nothing here raises on a tier fault and nothing returns unverified KV from ``load``.
    ``listener`` hears of every put that stored and every delete (a tier's own evictions are its
    own to report: ``DiskTier(on_evict=...)``).
    """

    def __init__(self, tiers: Sequence[Tier], metrics: StoreMetrics | None = None,
                 listener: StoreListener | None = None) -> None:
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self.tiers = tuple(tiers)
        self.metrics = metrics if metrics is not None else StoreMetrics()
        self.listener = listener

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    def get(self, key: str) -> StoreHit | None:
        """The first tier's bytes for ``key``, unverified; None when no tier has it."""
        for i, tier in enumerate(self.tiers):
            start = time.perf_counter()
            value = tier.get(key)
            if value is not None:
                seconds = time.perf_counter() - start
                self.metrics.hit(tier.name, len(value), seconds)
                return StoreHit(value, tier.name, self.tier_names[:i], seconds)
        self.metrics.miss()
        return None

    def get_many(self, keys: Sequence[str]) -> dict[str, StoreHit]:
        """Raw bytes of every key some tier holds (unverified: small records such as block indexes);
        each tier is asked once, for the keys the faster tiers did not have. Hits are not counted
        in the metrics (they count entries, not these records)."""
        found: dict[str, StoreHit] = {}
        todo = list(dict.fromkeys(keys))
        for i, tier in enumerate(self.tiers):
            if not todo:
                break
            start = time.perf_counter()
            values = tier.get_many(todo)
            seconds = time.perf_counter() - start
            for key, value in zip(todo, values, strict=True):
                if value is not None:
                    found[key] = StoreHit(value, tier.name, self.tier_names[:i], seconds)
            todo = [k for k in todo if k not in found]
        return found

    def load(self, key: str, expect: EntryExpectation) -> LoadedEntry | None:
        """The first copy of ``key`` that decodes and matches ``expect``; None means recompute.

        A copy that fails verification is counted, deleted from its tier (the recompute will write
        a good one) and skipped, and the next tier is asked.
        """
        for i, tier in enumerate(self.tiers):
            start = time.perf_counter()
            value = tier.get(key)
            if value is None:
                continue
            seconds = time.perf_counter() - start
            try:
                entry = decode_entry(value, expect)
            except EntryRejected as err:
                log.warning("kv store: rejected %s from tier %s: %s", key, tier.name, err)
                self.metrics.rejected(tier.name)
                self._delete(tier, key)
                continue
            self.metrics.hit(tier.name, len(value), seconds)
            return LoadedEntry(entry, tier.name, self.tier_names[:i], value, seconds)
        self.metrics.miss()
        return None

    def put(self, key: str, value: bytes, tiers: Collection[str] | None = None) -> tuple[str, ...]:
        """Write ``value`` to every tier, or only to those named; returns the tiers that stored it."""
        if tiers is not None and not set(tiers) <= set(self.tier_names):
            raise ValueError(f"unknown tiers {sorted(set(tiers) - set(self.tier_names))}")
        stored = []
        for tier in self.tiers:
            if (tiers is None or tier.name in tiers) and tier.put(key, value):
                self.metrics.written(tier.name, len(value))
                stored.append(tier.name)
                if self.listener is not None:
                    self.listener.stored(key, tier.name)
        return tuple(stored)

    def contains(self, key: str) -> tuple[str, ...]:
        """Names of the tiers that hold ``key`` (no bytes are read)."""
        return tuple(t.name for t in self.tiers if t.contains(key))

    def delete(self, key: str) -> None:
        for tier in self.tiers:
            self._delete(tier, key)

    def _delete(self, tier: Tier, key: str) -> None:
        tier.delete(key)
        if self.listener is not None:
            self.listener.removed(key, tier.name)

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
