"""``BackgroundWriter``: store writes off the request path, in one thread, with a bounded queue.

    request path ──submit(key, bytes)──────▶ [ bounded queue ] ──thread──▶ (encode) TieredStore.put
                 ──submit_entry(key, KVEntry)─▶  never blocks: when full, the write is dropped and counted

Dropping is safe: a missing entry is only a later miss (a recompute), never a wrong answer.
``flush`` waits for pending writes; ``close`` (also at process exit, via ``atexit``, and at the end
of a ``with`` block) flushes and stops the thread.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from types import TracebackType

from sparsex.kvstore.codec import KVEntry, StorageDtype, encode_entry
from sparsex.kvstore.metrics import StoreMetrics
from sparsex.kvstore.tiers import TieredStore

log = logging.getLogger("sparsex.kvstore")


@dataclass(frozen=True)
class _Write:
    key: str
    value: bytes | None
    """Encoded bytes, or None: encode ``entry`` in the writer thread."""
    entry: KVEntry | None
    storage: StorageDtype
    num_bytes: int
    tiers: Collection[str] | None
    more: tuple[tuple[str, bytes], ...] = ()
    """Further (key, bytes) written after this one, in order (small records that go with it)."""


class BackgroundWriter:
    """One daemon thread draining a queue of at most ``max_pending`` writes / ``max_pending_bytes``.

    Invariant: ``submit`` only appends under a lock or drops; it never waits for the store.
    """

    def __init__(
        self,
        store: TieredStore,
        *,
        max_pending: int = 64,
        max_pending_bytes: int = 1 << 30,
        close_timeout_s: float = 30.0,
        metrics: StoreMetrics | None = None,
    ) -> None:
        """
        max_pending / max_pending_bytes: queue bounds (entries are MBs each: bound the memory too).
        close_timeout_s: how long ``close`` (and process exit) waits for pending writes.
        """
        self.store = store
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.close_timeout_s = close_timeout_s
        self.metrics = metrics if metrics is not None else store.metrics
        self._cond = threading.Condition()
        self._queue: deque[_Write] = deque()
        self._pending_bytes = 0
        self._busy = False  # the thread is writing an item it took off the queue
        self._closed = False
        self.num_dropped = 0
        self.num_written = 0
        self._thread = threading.Thread(target=self._run, name="sparsex-kv-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @property
    def num_pending(self) -> int:
        """Writes queued or in progress."""
        with self._cond:
            return len(self._queue) + int(self._busy)

    def submit(
        self, key: str, value: bytes, tiers: Collection[str] | None = None, then: Sequence[tuple[str, bytes]] = ()
    ) -> bool:
        """Queue a write to ``tiers`` (default: all); False if it was dropped (queue full or closed).
        ``then``: as in ``submit_entry``."""
        num_bytes = len(value) + sum(len(v) for _, v in then)
        return self._enqueue(_Write(key, value, None, "float32", num_bytes, tiers, tuple(then)))

    def submit_entry(
        self, key: str, entry: KVEntry, storage: StorageDtype, tiers: Collection[str] | None = None,
        then: Sequence[tuple[str, bytes]] = (),
    ) -> bool:
        """Like ``submit``, but encoding (cast + checksum, ~1 s for 94 MB) also happens in the thread.

        ``entry``'s tensors must be the caller's own copy: the thread reads them later. ``then``:
        small (key, bytes) records written after the entry, as part of the same queued write (an
        index that points at the entry is never stored before the entry itself).
        """
        num_bytes = entry.keys.nbytes + entry.values.nbytes + sum(len(v) for _, v in then)
        return self._enqueue(_Write(key, None, entry, storage, num_bytes, tiers, tuple(then)))

    def _enqueue(self, item: _Write) -> bool:
        with self._cond:
            if self._closed:
                reason = "closed"
            elif len(self._queue) >= self.max_pending or (
                self._queue and self._pending_bytes + item.num_bytes > self.max_pending_bytes
            ):
                reason = "queue_full"
            else:
                self._queue.append(item)
                self._pending_bytes += item.num_bytes
                self.metrics.queued(1)
                self._cond.notify_all()
                return True
            self.num_dropped += 1
        self.metrics.dropped(reason)
        return False

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:  # closed and drained
                    return
                item = self._queue.popleft()
                self._pending_bytes -= item.num_bytes
                self._busy = True
            self.metrics.queued(-1)
            try:
                value = item.value
                if value is None:
                    assert item.entry is not None
                    value = encode_entry(item.entry, item.storage)
                self.store.put(item.key, value, item.tiers)
                for key, record in item.more:
                    self.store.put(key, record, item.tiers)
            except Exception:  # a tier bug must not kill the writer: later writes still matter
                log.exception("kv store: background write of %s failed", item.key)
            with self._cond:
                self._busy = False
                self.num_written += 1
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write submitted so far is done; False if ``timeout`` ran out first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush (up to ``timeout``, default ``close_timeout_s``), then stop; later submits are dropped.

        Returns False if writes were still pending when the time ran out (they are abandoned).
        Idempotent; the store itself is not closed (its owner closes it).
        """
        timeout = self.close_timeout_s if timeout is None else timeout
        drained = self.flush(timeout)
        with self._cond:
            self._closed = True
            abandoned = list(self._queue)
            self._queue.clear()
            self._pending_bytes = 0
            self._cond.notify_all()
        for _ in abandoned:
            self.metrics.queued(-1)
            self.metrics.dropped("closed")
        if abandoned:
            self.num_dropped += len(abandoned)
            log.warning("kv store: %d pending writes abandoned at close", len(abandoned))
        # a write still blocked in a slow tier is left to its timeout (daemon thread)
        self._thread.join(None if drained else 0.0)
        atexit.unregister(self.close)
        return drained

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
