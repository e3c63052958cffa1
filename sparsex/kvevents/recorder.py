"""``KVEventRecorder``: hears the cache and the store tiers, publishes vLLM KV events off-thread.

    engine thread  blocks_stored / block_removed (sparsex.cache)  ─┐
                   entry (kv.tiers: an entry and its tokens)       ├─▶ bounded queue ──thread──▶ EventBuilder
    writer thread  stored / removed (sparsex.kvstore, per tier)    ─┘   (put_nowait)            ─▶ EventBatch
                                                                                                ─▶ ZMQ PUB
Every call only appends to the queue: it never waits and never raises. When the queue is full the
change is dropped and counted, and the next batch skips a sequence number, so a subscriber sees a
gap. The thread hashes, encodes and sends; a failure there is logged and counted, and publishing
goes on. The first batch is ``AllBlocksCleared`` (a replica that restarts starts over), and so is
the last one, sent by :meth:`close`.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from sparsex.cache.listener import StoredBlocks
from sparsex.kvevents.builder import EventBuilder
from sparsex.kvevents.config import KVEventsConfig
from sparsex.kvevents.hashing import BlockHasher
from sparsex.kvevents.publisher import ZmqEventPublisher
from sparsex.kvevents.wire import BlockRemoved, EventBatch, KVCacheEvent

log = logging.getLogger("sparsex.kvevents")

MAX_BATCH_EVENTS = 1024
"""Most events in one published batch (a burst of changes goes out as several)."""


class KVEventRecorder:
    """A ``BlockListener`` (the pool) and a ``StoreListener`` (the tiers) that publishes KV events."""

    def __init__(self, config: KVEventsConfig, block_size: int) -> None:
        self.config = config
        self._publisher = ZmqEventPublisher(config.endpoint, config.replay_endpoint, config.topic,
                                            config.buffer_steps)
        self._builder = EventBuilder(block_size, BlockHasher(config.seed), config.token_ids)
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(config.max_queue)
        self._lock = threading.Lock()
        self._lost = False
        self._closing = False
        self._stop = threading.Event()
        self.num_dropped = 0
        """Changes dropped because the queue was full (or arrived after close)."""
        self.num_errors = 0
        """Changes or batches the thread failed to turn into events or to send."""
        self.num_batches = 0
        self._put(("cleared",))
        self._thread = threading.Thread(target=self._run, name="sparsex-kv-events", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # ----- what the cache and the tiers report (any thread; never blocks, never raises) -------------

    def blocks_stored(self, stored: StoredBlocks) -> None:
        self._put(("stored", stored))

    def block_removed(self, block_id: int) -> None:
        self._put(("removed", block_id))

    def entry(self, key: str, namespace: str, token_ids: Sequence[int]) -> None:
        """A store entry about to be written (or just promoted): its key's namespace and tokens."""
        self._put(("entry", key, namespace, tuple(token_ids)))

    def stored(self, key: str, tier: str) -> None:
        self._put(("entry_stored", key, tier))

    def removed(self, key: str, tier: str) -> None:
        self._put(("entry_removed", key, tier))

    def _put(self, record: tuple[Any, ...]) -> None:
        try:
            if self._closing:
                raise queue.Full
            self._queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self.num_dropped += 1
                self._lost = True
                n = self.num_dropped
            if n & (n - 1) == 0:  # 1, 2, 4, 8, ...: loud at first, quiet in a long outage
                log.warning("kv events: %d cache changes dropped (queue full or closed); subscribers see a gap", n)

    # ----- lifecycle ----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran and the publisher thread has stopped."""
        return self._closing and not self._thread.is_alive()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every change reported so far is published; False if ``timeout`` ran out."""
        q = self._queue
        with q.all_tasks_done:
            return q.all_tasks_done.wait_for(lambda: q.unfinished_tasks == 0, timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Publish ``AllBlocksCleared`` and what is pending (up to ``timeout``), stop, close the sockets.
        Idempotent."""
        if self._closing:
            return
        self._put(("cleared",))
        self._closing = True
        self.flush(timeout)
        self._stop.set()
        self._thread.join(timeout)
        atexit.unregister(self.close)

    # ----- the publisher thread -----------------------------------------------------------------------

    def _run(self) -> None:
        encoder = msgspec.msgpack.Encoder()
        try:
            while True:
                try:
                    record = self._queue.get(timeout=0.05)
                except queue.Empty:
                    self._serve_replay()
                    if self._stop.is_set():
                        return
                    continue
                taken, events = 1, self._apply(record)
                while len(events) < MAX_BATCH_EVENTS:
                    try:
                        events += self._apply(self._queue.get_nowait())
                    except queue.Empty:
                        break
                    taken += 1
                if events:
                    self._send(encoder, events)
                for _ in range(taken):
                    self._queue.task_done()
                self._serve_replay()
        finally:
            self._publisher.close()

    def _apply(self, record: tuple[Any, ...]) -> list[KVCacheEvent]:
        kind, *args = record
        b = self._builder
        try:
            if kind == "stored":
                return b.stored(*args)
            if kind == "removed":
                return b.removed(*args)
            if kind == "entry":
                return b.entry(*args)
            if kind == "entry_stored":
                return b.entry_stored(*args)
            if kind == "entry_removed":
                return b.entry_removed(*args)
            return b.cleared()
        except Exception:
            log.exception("kv events: could not turn a %s change into events; it is not published", kind)
            self.num_errors += 1
            return []

    def _send(self, encoder: msgspec.msgpack.Encoder, events: list[KVCacheEvent]) -> None:
        merged: list[KVCacheEvent] = []
        for e in events:  # consecutive removals from one medium go out as one event
            last = merged[-1] if merged else None
            if isinstance(e, BlockRemoved) and isinstance(last, BlockRemoved) and last.medium == e.medium:
                last.block_hashes.extend(e.block_hashes)
            else:
                merged.append(e)
        with self._lock:
            lost, self._lost = self._lost, False
        try:
            if lost:
                self._publisher.skip()
            batch = EventBatch(time.time(), merged, self.config.data_parallel_rank)  # type: ignore[arg-type]
            self._publisher.send(encoder.encode(batch))
            self.num_batches += 1
        except Exception:
            log.exception("kv events: could not publish a batch of %d events", len(merged))
            self.num_errors += 1

    def _serve_replay(self) -> None:
        try:
            self._publisher.serve_replay()
        except Exception:
            log.exception("kv events: replay request failed")
            self.num_errors += 1
