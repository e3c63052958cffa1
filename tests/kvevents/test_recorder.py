"""The publisher thread never blocks or fails the engine: a full queue drops (and says so with a
sequence gap), a failing change is skipped, close is clean. Loopback, bounded waits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from sparsex.cache.listener import StoredBlocks
from sparsex.kvevents import KVEventRecorder, KVEventsConfig
from sparsex.kvevents.builder import EventBuilder
from tests.kvevents.subscriber import AllBlocksCleared, BlockStored, Subscriber, free_port


@pytest.fixture
def endpoints() -> tuple[str, str]:
    return f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def sub(endpoints: tuple[str, str]) -> Iterator[Subscriber]:
    s = Subscriber(*endpoints)
    yield s
    s.close()


def block(i: int) -> StoredBlocks:
    return StoredBlocks("segment", "", tuple(range(i * 4, i * 4 + 4)), ((0, i),))


def test_a_full_queue_drops_without_waiting_and_leaves_a_gap(
    endpoints: tuple[str, str], sub: Subscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    real = EventBuilder.stored

    def stuck(self: EventBuilder, s: StoredBlocks) -> Any:
        if s.blocks[0][1] == 0:  # the first change holds the publisher thread
            entered.set()
            assert release.wait(10)
        return real(self, s)

    monkeypatch.setattr(EventBuilder, "stored", stuck)
    rec = KVEventRecorder(KVEventsConfig(*endpoints, max_queue=4), block_size=4)
    rec.blocks_stored(block(0))
    assert entered.wait(10)
    for i in range(1, 11):  # the queue holds 4; the thread is stuck: 6 are dropped, none waits
        rec.blocks_stored(block(i))
    assert rec.num_dropped == 6
    release.set()
    assert rec.flush()
    rec.blocks_stored(block(20))  # published after the loss: its sequence number skips one
    assert rec.flush()
    sub.drain()
    seqs = [seq for seq, _ in sub.batches]
    assert seqs[0] == 0 and len(seqs) == seqs[-1]  # one number never arrives, not even by replay
    stored = [e for e in sub.events() if isinstance(e, BlockStored)]
    assert len(stored) == 6  # blocks 0-4 and 20
    rec.close()


def test_a_change_that_fails_is_skipped_and_publishing_goes_on(
    endpoints: tuple[str, str], sub: Subscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = EventBuilder.stored

    def broken(self: EventBuilder, s: StoredBlocks) -> Any:
        if s.blocks[0][1] == 1:
            raise RuntimeError("boom")
        return real(self, s)

    monkeypatch.setattr(EventBuilder, "stored", broken)
    rec = KVEventRecorder(KVEventsConfig(*endpoints), block_size=4)
    for i in range(3):
        rec.blocks_stored(block(i))
    assert rec.flush()
    sub.drain()
    assert rec.num_errors == 1
    assert len([e for e in sub.events() if isinstance(e, BlockStored)]) == 2
    rec.close()


def test_close_publishes_the_end_and_frees_the_endpoint(endpoints: tuple[str, str], sub: Subscriber) -> None:
    rec = KVEventRecorder(KVEventsConfig(*endpoints), block_size=4)
    rec.blocks_stored(block(0))
    assert rec.flush()
    sub.drain()
    rec.close()
    rec.close()  # idempotent
    rec.blocks_stored(block(1))  # after close: dropped, not raised
    sub.until_closed()
    assert isinstance(sub.events()[-1], AllBlocksCleared)
    KVEventRecorder(KVEventsConfig(*endpoints), block_size=4).close()  # the endpoint is free again


def test_endpoints_are_checked() -> None:
    with pytest.raises(ValueError, match="tcp://, ipc:// or inproc://"):
        KVEventsConfig("localhost:5557")
