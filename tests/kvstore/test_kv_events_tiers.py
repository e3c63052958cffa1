"""KV events of the store tiers: entries written to disk and Redis announced per medium, a disk
eviction announced, and a second replica announcing what it promoted from the shared Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sparsex import LLM, SamplingParams, Segment
from sparsex.kvevents import KVEventsConfig
from tests.kvevents.subscriber import BlockRemoved, Subscriber, free_port, segment_hashes
from tests.kvstore.conftest import RedisServer
from tests.tiny_models import make_llm

BS = 16
ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
PLAIN = {"auto_segments": False}
QUESTION = [5, 6, 7, 8, 9, 11, 12]


def doc(n_blocks: int, start: int) -> list[int]:
    return [10 + (start + i) % 300 for i in range(n_blocks * BS)]


@pytest.fixture
def replica(tiny_model_dir: Any) -> Iterator[Any]:
    """Factory: an engine with KV events and the given tiers, and a subscriber to it."""
    made: list[tuple[LLM, Subscriber]] = []

    def make(**tiers: Any) -> tuple[LLM, Subscriber]:
        endpoints = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        sub = Subscriber(*endpoints)
        llm = make_llm(tiny_model_dir("llama"), num_blocks=64, kv_events=KVEventsConfig(*endpoints, hash_seed="vllm-none-hash"),
                       **tiers)
        made.append((llm, sub))
        return llm, sub

    yield make
    for llm, sub in made:
        llm.close()
        sub.close()


def settle(llm: LLM, sub: Subscriber) -> None:
    """Pending tier writes done, their events published and read."""
    assert llm.engine.tiers is not None and llm.engine.tiers.writer.flush(30)
    assert llm.kv_events is not None and llm.kv_events.flush()
    sub.drain()


def test_disk_and_redis_entries_are_announced_per_medium(
    replica: Any, tmp_path: Path, redis_server: RedisServer
) -> None:
    # room on disk for one 3-block entry of the tiny model (18 KB in bf16) and its index records
    llm, sub = replica(kv_disk=str(tmp_path / "disk"), kv_disk_bytes=30_000, kv_store=redis_server.url)
    first, second = doc(3, 0), doc(3, 100)
    llm.generate([[Segment(first), QUESTION]], ONE, reuse=PLAIN)
    settle(llm, sub)
    assert sub.view.live["DISK"] == set(segment_hashes(first, BS)) == sub.view.live["REDIS"]
    assert set(segment_hashes(first, BS)) <= sub.view.gpu()

    llm.generate([[Segment(second), QUESTION]], ONE, reuse=PLAIN)
    settle(llm, sub)
    assert sub.view.live["DISK"] == set(segment_hashes(second, BS))  # the first entry was evicted
    removed = [e for e in sub.events() if isinstance(e, BlockRemoved) and e.medium == "DISK"]
    assert removed and set(removed[0].block_hashes) == set(segment_hashes(first, BS))
    assert sub.view.live["REDIS"] == set(segment_hashes(first, BS)) | set(segment_hashes(second, BS))


def test_a_replica_announces_what_it_promoted_from_redis(replica: Any, redis_server: RedisServer) -> None:
    a, _ = replica(kv_store=redis_server.url)
    d = doc(4, 40)
    a.generate([[Segment(d), QUESTION]], ONE, reuse=PLAIN)
    assert a.engine.tiers is not None and a.engine.tiers.writer.flush(30)

    b, sub_b = replica(kv_store=redis_server.url)
    out = b.generate([[[1, 2, 3], Segment(d), QUESTION]], ONE, reuse={**PLAIN, "method": "naive"})[0]
    assert out.metrics.num_segment_hit_tokens == len(d)
    settle(b, sub_b)
    assert set(segment_hashes(d, BS)) <= sub_b.view.gpu()
    assert sub_b.view.live["REDIS"] == set(segment_hashes(d, BS))
