"""An engine publishing KV events, read by a subscriber written from vLLM's layout (``subscriber.py``):
store, evict, clear, close, restart, two tenants, replay. Loopback only, every wait bounded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sparsex import LLM, SamplingParams, Segment
from sparsex.kvevents import KVEventsConfig
from tests.kvevents.subscriber import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Subscriber,
    free_port,
    segment_hashes,
    vllm_prefix_hashes,
)
from tests.tiny_models import make_llm

BS = 16
ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
PLAIN = {"auto_segments": False}  # only explicit segments: every published block is predictable


@pytest.fixture(scope="module")
def llama(tiny_model_dir: Any) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture
def endpoints() -> tuple[str, str]:
    return f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def sub(endpoints: tuple[str, str]) -> Iterator[Subscriber]:
    s = Subscriber(*endpoints, topic="kv-events")
    yield s
    s.close()


def engine(folder: Path, endpoints: tuple[str, str], num_blocks: int = 64, **config: Any) -> LLM:
    config.setdefault("hash_seed", "vllm-none-hash")  # vLLM's default, whatever PYTHONHASHSEED says here
    cfg = KVEventsConfig(endpoints[0], endpoints[1], topic="kv-events", **config)
    return make_llm(folder, num_blocks=num_blocks, kv_events=cfg)  # type: ignore[no-any-return]


def doc(n_blocks: int, start: int) -> list[int]:
    """Distinct token ids, a whole number of blocks (no partial segment block)."""
    return [10 + (start + i) % 300 for i in range(n_blocks * BS)]


QUESTION = [5, 6, 7, 8, 9, 11, 12]


def published(llm: LLM, sub: Subscriber) -> None:
    assert llm.kv_events is not None and llm.kv_events.flush()
    sub.drain()


def test_store_publishes_prefix_and_segment_blocks_in_vllm_format(llama: Path, endpoints: Any, sub: Subscriber) -> None:
    llm = engine(llama, endpoints)
    d = doc(3, 0)
    llm.generate([[Segment(d), QUESTION]], ONE, reuse=PLAIN)
    published(llm, sub)

    seqs = [seq for seq, _ in sub.batches]
    assert seqs == list(range(len(seqs))), "sequence numbers start at 0, no gap"
    assert all(b.data_parallel_rank == 0 and b.ts > 0 for _, b in sub.batches)
    events = sub.events()
    assert isinstance(events[0], AllBlocksCleared)  # a new stream starts from nothing
    stored = [e for e in events if isinstance(e, BlockStored)]
    prefix = next(e for e in stored if not e.extra_keys)
    assert prefix.block_hashes == vllm_prefix_hashes(d + QUESTION, BS)  # the prompt's 3 full blocks
    assert prefix.parent_block_hash is None and prefix.token_ids == d and prefix.block_size == BS
    assert (prefix.medium, prefix.lora_id, prefix.lora_name) == ("GPU", None, None)
    segment = next(e for e in stored if e.extra_keys)
    assert segment.block_hashes == segment_hashes(d, BS)
    assert segment.extra_keys == [("sparsex:segment",)] * 3 and segment.parent_block_hash is None
    assert segment.token_ids == d
    assert not set(segment.block_hashes) & set(prefix.block_hashes)
    assert sub.view.gpu() == set(prefix.block_hashes) | set(segment.block_hashes)
    assert len(sub.view.gpu()) == llm.engine.pool.num_cached_blocks

    # the same prompt again: nothing new is cached, nothing is announced
    before = len(sub.events())
    llm.generate([[Segment(d), QUESTION]], ONE, reuse=PLAIN)
    published(llm, sub)
    assert len(sub.events()) == before
    llm.close()


def test_a_later_prefix_block_names_its_parent(llama: Path, endpoints: Any, sub: Subscriber) -> None:
    llm = engine(llama, endpoints)
    d = doc(2, 50)
    llm.generate([d + QUESTION], ONE, reuse=PLAIN)  # 2 full blocks
    longer = d + doc(2, 120) + QUESTION
    llm.generate([longer], ONE, reuse=PLAIN)  # blocks 0-1 hit, 2-3 new
    published(llm, sub)
    chain = vllm_prefix_hashes(longer, BS)
    new = [e for e in sub.events() if isinstance(e, BlockStored)][-1]
    assert new.block_hashes == chain[2:4] and new.parent_block_hash == chain[1]
    assert new.token_ids == longer[2 * BS : 4 * BS]
    llm.close()


def test_evictions_and_clear_keep_the_router_view_equal_to_the_pool(llama: Path, endpoints: Any, sub: Subscriber) -> None:
    llm = engine(llama, endpoints, num_blocks=12)
    stored_ever: set[int] = set()
    for k in range(5):  # each prompt caches 6 blocks (3 prefix + 3 segment) in a 12-block pool
        llm.generate([[Segment(doc(3, 60 * k)), QUESTION]], ONE, reuse=PLAIN)
        published(llm, sub)
        stored_ever |= {h for e in sub.events() if isinstance(e, BlockStored) for h in e.block_hashes}  # type: ignore[misc]
        assert len(sub.view.gpu()) == llm.engine.pool.num_cached_blocks  # view.apply checks every removal was stored
    removed = [e for e in sub.events() if isinstance(e, BlockRemoved)]
    assert removed and all(e.medium == "GPU" for e in removed)
    assert {h for e in removed for h in e.block_hashes} <= stored_ever

    assert llm.engine.pool.clear_cached() > 0
    published(llm, sub)
    assert sub.view.gpu() == set() and llm.engine.pool.num_cached_blocks == 0

    llm.close()  # the last batch says everything is gone
    sub.until_closed()
    assert isinstance(sub.events()[-1], AllBlocksCleared)


def test_restart_starts_a_new_stream_on_the_same_endpoint(llama: Path, endpoints: Any, sub: Subscriber) -> None:
    llm = engine(llama, endpoints)
    llm.generate([[Segment(doc(2, 0)), QUESTION]], ONE, reuse=PLAIN)
    published(llm, sub)
    assert sub.view.gpu()
    llm.close()
    sub.until_closed()
    assert isinstance(sub.events()[-1], AllBlocksCleared) and not sub.view.gpu()

    sub.expect_restart()
    first = len(sub.batches)
    again = engine(llama, endpoints)  # binds the same endpoints: the first engine gave them back
    d = doc(2, 200)
    again.generate([[Segment(d), QUESTION]], ONE, reuse=PLAIN)
    published(again, sub)
    seq0, batch0 = sub.batches[first]
    assert seq0 == 0 and isinstance(batch0.events[0], AllBlocksCleared)
    assert sub.view.gpu() == set(vllm_prefix_hashes(d + QUESTION, BS)) | set(segment_hashes(d, BS))
    again.close()


def test_live_stream_delivers_without_replay(llama: Path, endpoints: Any, sub: Subscriber) -> None:
    llm = engine(llama, endpoints)
    k = 0
    while sub.num_live == 0:  # bounded: the subscription takes a moment to reach the publisher
        assert k < 50, "no batch ever arrived on the SUB socket"
        llm.generate([[Segment(doc(1, 7 * k)), QUESTION]], ONE, reuse=PLAIN)
        assert llm.kv_events is not None and llm.kv_events.flush()
        sub.poll(200)
        k += 1
    llm.close()


def tenant_events(llm: LLM, sub: Subscriber, namespace: str, d: list[int]) -> list[BlockStored]:
    n = len(sub.events())
    llm.generate([[Segment(d, namespace), QUESTION]], ONE, reuse={**PLAIN, "namespace": namespace})
    published(llm, sub)
    return [e for e in sub.events()[n:] if isinstance(e, BlockStored)]


def test_tenants_blocks_carry_no_token_ids_and_never_their_name(llama: Path, endpoints: Any, sub: Subscriber) -> None:
    llm = engine(llama, endpoints)
    d = doc(2, 30)
    alice = tenant_events(llm, sub, "alice/", d)
    bob = tenant_events(llm, sub, "bob/", d)
    shared = tenant_events(llm, sub, "", d)
    for events in (alice, bob):
        assert events and all(e.token_ids == [] for e in events)
    assert all(e.token_ids for e in shared)  # the shared namespace is everyone's
    # same text, three namespaces: three sets of hashes, each recomputable with its namespace
    assert alice[0].block_hashes == vllm_prefix_hashes(d + QUESTION, BS, cache_salt="alice/")
    assert alice[1].block_hashes == segment_hashes(d, BS, namespace="alice/")
    assert bob[0].block_hashes == vllm_prefix_hashes(d + QUESTION, BS, cache_salt="bob/")
    assert shared[0].block_hashes == vllm_prefix_hashes(d + QUESTION, BS)
    assert not set(alice[0].block_hashes) & set(bob[0].block_hashes)
    for payload in sub.raw:
        assert b"alice" not in payload and b"bob" not in payload
    llm.close()


def test_token_ids_of_every_namespace_when_the_operator_opts_in(llama: Path, endpoints: Any, sub: Subscriber) -> None:
    llm = engine(llama, endpoints, token_ids=True)
    d = doc(2, 90)
    alice = tenant_events(llm, sub, "alice/", d)
    assert [e.token_ids for e in alice] == [d, d]
    for payload in sub.raw:
        assert b"alice" not in payload
    llm.close()


def test_hash_seed_is_vllms_pythonhashseed(llama: Path, endpoints: Any, sub: Subscriber) -> None:
    llm = engine(llama, endpoints, hash_seed="1234")
    d = doc(1, 0)
    llm.generate([d + QUESTION], ONE, reuse=PLAIN)
    published(llm, sub)
    stored = [e for e in sub.events() if isinstance(e, BlockStored)]
    assert stored[0].block_hashes == vllm_prefix_hashes(d + QUESTION, BS, seed="1234")
    llm.close()


def test_a_busy_endpoint_fails_at_construction(llama: Path, endpoints: Any) -> None:
    llm = engine(llama, endpoints)
    with pytest.raises(ValueError, match="cannot bind the KV events socket"):
        engine(llama, endpoints)
    llm.close()
