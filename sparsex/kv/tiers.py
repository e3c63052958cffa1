"""The KV pool's tiers below it: published segments written to disk / Redis, found again anywhere.

    publish (fresh KV) ── SegmentStore.on_publish ──▶ TierCache.on_published
                             entry: token ids, positions, K/V ─▶ BackgroundWriter ─▶ disk, Redis
                             + one block-index record per full block of the entry (same write)
    step() ── TierCache.prefetch(waiting requests), once per request, before admission:
               prompt positions the pool does not hold ─▶ block-window hashes ─▶ index records
               (one MGET) ─▶ TieredStore.load(entry) (checksum + content hash verified)
               ─▶ SegmentStore.publish_kv: promoted into the pool like fresh KV
               ─▶ admission's ordinary pool lookup finds it (prefix, segments, any-offset runs)
    pins ── written through (synchronously) + a pins manifest; a new engine restores and re-pins them

Keys (``sparsex.kvstore.keys``), all under one model fingerprint and namespace (one Cluster slot)::

    entry   sparsex:{fp.ns}:<64 hex>   content hash = BLAKE2b-256 of the entry's token ids, keyed by ns
    block   sparsex:{fp.ns}:<32 hex>   keyed hash of one full block's token ids -> (entry hash, block index)
    pins    sparsex:{fp.<pins ns>}:00  JSON list of pinned entries (every namespace)

    entry  e0 e1 e2 e3 | e4 e5 e6 e7 | e8 e9          B = 4: index records for blocks 0 and 1
    prompt x0 x1 e2 e3 e4 e5 e6 e7 e8 y0              the window at every prompt position is hashed;
                 window at p=4 = e4..e7 -> block 1     the one at p = 4 hits block 1 of the entry

Every run of at least ``2B - 1`` tokens holds a full block of its entry, so any-offset runs (the
pool's ``find_runs``) are found through the tiers too. An index record is a hint: what is served is
only an entry whose checksum verifies and whose token ids hash to its key, and the pool lookup then
checks every reused token again.

Faults never reach the request: a tier fault is a miss, and any failure while promoting skips
that entry (the request recomputes it).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sparsex.kv.admission import AdmissionRequest, namespace_regions
from sparsex.kv.segment_store import PublishedSegment, SegmentStore
from sparsex.kv.tier_keys import (
    INDEX_VERSION,
    PINS_NAMESPACE,
    block_hash,
    entry_hash,
    index_record,
    parse_index_record,
    weights_identity,
    window_hashes,
)
from sparsex.kvevents import KVEventRecorder
from sparsex.kvstore import (
    BackgroundWriter,
    DiskTier,
    EntryExpectation,
    KVEntry,
    LoadedEntry,
    RedisTier,
    StorageDtype,
    Tier,
    TieredStore,
    encode_entry,
    entry_key,
    model_fingerprint,
)
from sparsex.kvstore.keys import key_prefix
from sparsex.segments import SegmentSpan


class PrefetchRequest(AdmissionRequest, Protocol):
    """What the prefetch reads of a waiting request (``sparsex.core.request.Request`` is one)."""

    @property
    def request_id(self) -> str: ...

log = logging.getLogger("sparsex.kvstore")

_MAX_EVENTS = 1024
_MAX_KNOWN = 4096


@dataclass(frozen=True)
class TierOptions:
    """Which tiers an engine keeps below its KV pool.

    redis_url: ``redis://host:port/db`` shared by every replica (None: no Redis tier).
    disk_path: a folder on this machine (None: no disk tier). disk_bytes: its byte budget.
    storage_dtype: K/V dtype in the tiers (``float32`` round-trips bitwise; ``bfloat16`` halves bytes).
    max_entries_per_request: most entries one request's prefetch loads.
    """

    redis_url: str | None = None
    disk_path: str | None = None
    disk_bytes: int = 8 << 30
    storage_dtype: StorageDtype = "bfloat16"
    max_entries_per_request: int = 64


@dataclass(frozen=True)
class CacheEvent:
    """What happened to an entry in this replica: ``published`` (fresh KV written below the pool),
    ``promoted`` (loaded from a tier into the pool), ``pinned`` / ``unpinned``."""

    seq: int
    kind: str
    key: str
    namespace: str
    num_tokens: int
    tier: str | None = None


@dataclass
class TierStats:
    """Cumulative promotion counters (read by ``sparsex bench store``)."""

    num_promoted: int = 0
    num_rejected: int = 0
    bytes_by_tier: dict[str, int] = field(default_factory=dict)
    read_s_by_tier: dict[str, float] = field(default_factory=dict)
    promote_s: float = 0.0
    """Total prefetch time (index lookup, load, decode, copy into the pool)."""


@dataclass
class _Known:
    token_ids: list[int]
    namespace: str
    start_pos: int


class TierCache:
    """Writes published segments below the pool and promotes stored ones into it.

    Invariants: nothing here raises into a request (faults are misses, a failed promotion skips
    the entry); nothing unverified reaches the pool (checksum, content hash = hash of the token ids,
    positions contiguous); promoted entries are never written back as fresh ones.
    """

    def __init__(self, store: SegmentStore, fingerprint: str, tiers: TieredStore, options: TierOptions,
                 writer: BackgroundWriter | None = None, kv_events: KVEventRecorder | None = None) -> None:
        """``kv_events``: told each entry's tokens before it is written (KV events per tier)."""
        self.segments = store
        self.kv_events = kv_events
        self.fingerprint = fingerprint
        self.tiers = tiers
        self.options = options
        self.writer = writer if writer is not None else BackgroundWriter(tiers)
        self.block_size = store.pool.block_size
        self.stats = TierStats()
        self.events: deque[CacheEvent] = deque(maxlen=_MAX_EVENTS)
        self._seq = 0
        self._prefetched: set[str] = set()  # waiting requests already looked up
        self._known: OrderedDict[str, _Known] = OrderedDict()  # entries this replica wrote/promoted
        self._pins: dict[str, str] = {}  # pinned segment id -> entry key
        store.on_publish = self.on_published

    @classmethod
    def open(cls, store: SegmentStore, model_path: Path, kv_dtype: str, options: TierOptions,
             kv_events: KVEventRecorder | None = None) -> TierCache:
        """The tiers of ``options`` (disk first, then Redis) for this model; restores pinned entries."""
        tiers: list[Tier] = []
        if options.disk_path is not None:
            evicted = None if kv_events is None else functools.partial(kv_events.removed, tier="disk")
            tiers.append(DiskTier(options.disk_path, options.disk_bytes, on_evict=evicted))
        if options.redis_url is not None:
            tiers.append(RedisTier(options.redis_url))
        fp = model_fingerprint(weights_identity(model_path), kv_dtype, store.pool.block_size)
        cache = cls(store, fp, TieredStore(tiers, listener=kv_events), options, kv_events=kv_events)
        cache.restore_pins()
        return cache

    # ----- writing -------------------------------------------------------------------------------

    def on_published(self, seg: PublishedSegment) -> None:
        """``SegmentStore.on_publish``: queue the segment's entry (and its block index) for the tiers;
        a pinned one is written through. Never raises."""
        try:
            self._write(seg)
        except Exception:
            log.exception("kv store: could not write a published segment; it stays in the pool only")

    def _write(self, seg: PublishedSegment) -> None:
        content = entry_hash(seg.token_ids, seg.namespace)
        key = entry_key(self.fingerprint, seg.namespace, content)
        if key in self._known and seg.segment_id is None:
            self._known.move_to_end(key)
            return  # already written by this replica (or promoted from a tier)
        kv = self.segments.kv
        slots = seg.slots.to(kv.k.device)
        keys, values = kv.k[:, slots].cpu(), kv.v[:, slots].cpu()  # own copies: [L, T, H, D]
        positions = list(range(seg.start_pos, seg.start_pos + len(seg.token_ids)))
        entry = KVEntry(self.fingerprint, seg.namespace, content, list(seg.token_ids),
                        positions, keys, values)
        records = self._index_records(entry)
        if self.kv_events is not None:
            self.kv_events.entry(key, seg.namespace, seg.token_ids)
        if seg.segment_id is not None:  # written through: a restart must find it
            value = encode_entry(entry, self.options.storage_dtype)
            stored = self.tiers.put(key, value)
            for rkey, record in records:
                self.tiers.put(rkey, record)
            if stored:
                self._pins[seg.segment_id] = key
                self._update_manifest(add=(key, seg))
        elif not self.writer.submit_entry(key, entry, self.options.storage_dtype, then=records):
            return  # dropped (queue full): a later publish of the same segment tries again
        self._remember(key, _Known(list(seg.token_ids), seg.namespace, seg.start_pos))
        self._event("pinned" if seg.segment_id is not None else "published", key, seg.namespace, len(seg.token_ids))

    def _index_records(self, entry: KVEntry) -> list[tuple[str, bytes]]:
        """One (key, record) per full block of ``entry``: where to find it from any of its blocks."""
        bs, toks = self.block_size, entry.token_ids
        out = []
        for i in range(len(toks) // bs):
            rkey = entry_key(self.fingerprint, entry.namespace, block_hash(toks[i * bs : (i + 1) * bs], entry.namespace))
            out.append((rkey, index_record(entry.content_hash, i)))
        return out

    # ----- lookup + promotion ----------------------------------------------------------------------

    def prefetch(self, waiting: Iterable[PrefetchRequest], max_requests: int = 2) -> int:
        """Promote into the pool what the tiers hold for the first ``max_requests`` waiting requests
        not looked up yet (admission takes the queue's head: the rest wait for later steps, so one
        step never pays for a whole queue). Returns the number of entries promoted. Never raises."""
        live: set[str] = set()
        promoted = 0
        budget = max_requests
        for req in waiting:
            live.add(req.request_id)
            if req.request_id in self._prefetched or not req.reuses_segments or budget == 0:
                continue
            budget -= 1
            self._prefetched.add(req.request_id)
            t0 = time.perf_counter()
            try:
                promoted += self._prefetch(req.prompt_token_ids, req.spans, req.cache.namespace)
            except Exception:
                log.exception("kv store: prefetch failed; the request recomputes")
            self.stats.promote_s += time.perf_counter() - t0
        self._prefetched &= live
        return promoted

    def _prefetch(self, ids: list[int], spans: Sequence[SegmentSpan], ns: str) -> int:
        bs, n = self.block_size, len(ids)
        wanted: dict[str, tuple[str, int]] = {}  # index key -> (namespace, prompt position)
        for a, b, region_ns in namespace_regions(0, n - 1, spans, ns):  # never the last token
            covered = self._pool_covered(ids[a:b], region_ns)
            prefix = key_prefix(self.fingerprint, region_ns)
            for p, window in enumerate(window_hashes(ids[a:b], bs, region_ns), start=a):
                if not all(covered[p - a : p - a + bs]):
                    wanted.setdefault(prefix + window, (region_ns, p))
        if not wanted:
            return 0
        records = self.tiers.get_many(list(wanted))
        entries: dict[str, tuple[str, str]] = {}  # entry key -> (namespace, content hash), prompt order
        for rkey, hit in sorted(records.items(), key=lambda kv: wanted[kv[0]][1]):
            region_ns, _ = wanted[rkey]
            content = parse_index_record(hit.value)
            if content is None:
                continue
            ekey = entry_key(self.fingerprint, region_ns, content)
            if ekey not in entries:
                entries[ekey] = (region_ns, content)
        promoted = 0
        for ekey, (region_ns, content) in list(entries.items())[: self.options.max_entries_per_request]:
            try:
                promoted += self._promote(ekey, region_ns, content)
            except Exception:
                log.exception("kv store: promoting %s failed; skipped", ekey)
        return promoted

    def _pool_covered(self, ids: list[int], ns: str) -> list[bool]:
        """Which of ``ids`` the pool already holds as any-offset runs (no references taken)."""
        covered = [False] * len(ids)
        if len(ids) < self.block_size:
            return covered
        for run in self.segments.manager.segments.run_matcher.find(ids, ns):
            covered[run.prompt_start : run.prompt_end] = [True] * run.num_tokens
        return covered

    def _load(self, key: str, ns: str, content: str) -> LoadedEntry | None:
        hit = self.tiers.load(key, EntryExpectation(self.fingerprint, ns, content, None))
        if hit is None:
            return None
        e = hit.entry
        contiguous = e.positions == list(range(e.positions[0], e.positions[0] + e.num_tokens)) if e.positions else False
        if entry_hash(e.token_ids, ns) != content or not contiguous:  # intact, but not what its key names
            log.warning("kv store: rejected %s from tier %s: token ids or positions do not match", key, hit.tier)
            self.stats.num_rejected += 1
            self.tiers.metrics.rejected(hit.tier)
            self.tiers.delete(key)
            return None
        self.stats.bytes_by_tier[hit.tier] = self.stats.bytes_by_tier.get(hit.tier, 0) + len(hit.value)
        self.stats.read_s_by_tier[hit.tier] = self.stats.read_s_by_tier.get(hit.tier, 0.0) + hit.seconds
        return hit

    def _promote(self, key: str, ns: str, content: str, pin_name: str | None = None,
                 pinned: bool = False) -> int:
        hit = self._load(key, ns, content)
        if hit is None:
            return 0
        e = hit.entry
        published, sid = self.segments.publish_kv(e.token_ids, ns, e.positions[0], e.keys, e.values,
                                                  pinned=pinned, name=pin_name)
        if not published:
            return 0
        if self.kv_events is not None:  # the tier it came from holds it too
            self.kv_events.entry(key, ns, e.token_ids)
            self.kv_events.stored(key, hit.tier)
        if hit.missed:  # copy into the faster tiers, with the block index
            self.writer.submit(key, hit.value, tiers=hit.missed, then=self._index_records(e))
        self._remember(key, _Known(e.token_ids, ns, e.positions[0]))
        if sid is not None:
            self._pins[sid] = key
        self.stats.num_promoted += 1
        self._event("promoted", key, ns, e.num_tokens, hit.tier)
        return 1

    # ----- pins ------------------------------------------------------------------------------------

    def _manifest_key(self) -> str:
        return entry_key(self.fingerprint, PINS_NAMESPACE, "00")

    def _read_manifest(self) -> list[dict[str, Any]]:
        hit = self.tiers.get(self._manifest_key())
        if hit is None:
            return []
        try:
            data = json.loads(hit.value)
            pins = data["pins"] if data.get("v") == INDEX_VERSION else []
            return [p for p in pins if isinstance(p, dict) and {"key", "namespace", "content"} <= p.keys()]
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("kv store: unreadable pins manifest ignored")
            return []

    def _update_manifest(self, add: tuple[str, PublishedSegment] | None = None,
                         remove: Iterable[str] = ()) -> None:
        """Read, merge, write (last writer wins: pin on one replica at a time)."""
        drop = set(remove)
        pins = [p for p in self._read_manifest() if p["key"] not in drop]
        if add is not None:
            key, seg = add
            pins = [p for p in pins if p["key"] != key]
            pins.append({"key": key, "namespace": seg.namespace, "content": entry_hash(seg.token_ids, seg.namespace),
                         "name": seg.name, "num_tokens": len(seg.token_ids)})
        self.tiers.put(self._manifest_key(), json.dumps({"v": INDEX_VERSION, "pins": pins}).encode())

    def restore_pins(self) -> list[str]:
        """Load and pin again every entry of the pins manifest; returns the segment ids pinned."""
        restored = []
        for p in self._read_manifest():
            try:
                if self._promote(p["key"], p["namespace"], p["content"], p.get("name"), pinned=True):
                    restored += [sid for sid, k in self._pins.items() if k == p["key"]]
            except Exception:
                log.exception("kv store: restoring pinned entry %s failed; skipped", p["key"])
        return restored

    def unpinned(self, segment_ids: Iterable[str]) -> None:
        """Segments unpinned by the user: they leave the manifest (their entries stay as cache)."""
        keys = [self._pins.pop(sid) for sid in segment_ids if sid in self._pins]
        if keys:
            try:
                self._update_manifest(remove=keys)
            except Exception:
                log.exception("kv store: could not update the pins manifest")
            for key in keys:
                known = self._known.get(key)
                self._event("unpinned", key, known.namespace if known else "", len(known.token_ids) if known else 0)

    # ----- placement ---------------------------------------------------------------------------------

    def entries(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Entries this replica wrote or promoted that its pool still holds in full (for routers)."""
        out = []
        index = self.segments.manager.segments
        pinned = {k: sid for sid, k in self._pins.items()}
        for key, k in reversed(self._known.items()):
            if namespace is not None and k.namespace != namespace:
                continue
            if index.missing_blocks(k.token_ids, k.namespace):
                continue
            out.append({"key": key, "namespace": k.namespace, "num_tokens": len(k.token_ids),
                        "position": k.start_pos, "segment_id": pinned.get(key)})
        return out

    def events_since(self, seq: int = 0, namespace: str | None = None) -> list[CacheEvent]:
        """Cache events after ``seq`` (the last ``_MAX_EVENTS`` are kept), oldest first; read from
        the newest back, so polling costs only the new events."""
        out = list(itertools.takewhile(lambda e: e.seq > seq, reversed(self.events)))
        return [e for e in reversed(out) if namespace is None or e.namespace == namespace]

    def _event(self, kind: str, key: str, ns: str, num_tokens: int, tier: str | None = None) -> None:
        self._seq += 1
        self.events.append(CacheEvent(self._seq, kind, key, ns, num_tokens, tier))

    def _remember(self, key: str, known: _Known) -> None:
        self._known[key] = known
        self._known.move_to_end(key)
        while len(self._known) > _MAX_KNOWN:
            self._known.popitem(last=False)

    def close(self) -> None:
        """Flush pending writes (bounded by the writer's close timeout), then close the tiers."""
        self.writer.close()
        self.tiers.close()
