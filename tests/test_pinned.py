"""Pinned ("frozen") segments: a knowledge base cached ahead of time, kept until deleted, dropped
least-used first only once the KV pool passes its high-water mark."""

from __future__ import annotations

from pydoc_data.topics import topics
from typing import Any

import pytest

from sparsex import LLM, SamplingParams, Segment
from tests.tiny_models import make_llm

BS = 16
ONE = SamplingParams(max_tokens=1, temperature=0.0)


@pytest.fixture(scope="module")
def llama(tiny_model_dir: Any) -> Any:
    return tiny_model_dir("llama")


def docs_of(llm: LLM, *lengths: int) -> list[list[int]]:
    """Distinct documents of real text with the given token lengths."""
    ids = llm.tokenizer.encode(topics["class"])
    out, at = [], 0
    for n in lengths:
        out.append(ids[at : at + n])
        at += n
    assert all(len(d) == n for d, n in zip(out, lengths, strict=True))
    return out


def ask(llm: LLM, *docs: list[int], lead: str = "Question:", **reuse: Any) -> Any:
    """One request with the documents as segments after some leading text; returns its metrics."""
    prompt = [lead, *(Segment(d) for d in docs), "?"]
    return llm.generate([prompt], ONE, reuse={"method": "naive", **reuse})[0].metrics


def listing(llm: LLM) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in llm.list_segments()}


def test_cache_list_hit_uncache(llama: Any) -> None:
    llm = make_llm(llama, num_blocks=64)
    kb = docs_of(llm, 40, 23)
    text_doc = topics["assert"][:200]
    ids = llm.cache_segments([*kb, text_doc], names=["first", "second", "text"])
    assert len(ids) == len(set(ids)) == 3 and all(isinstance(i, str) for i in ids)
    segs = listing(llm)
    assert list(segs) == ids
    n_text = len(llm.tokenizer.encode(text_doc))
    assert [segs[i]["num_tokens"] for i in ids] == [40, 23, n_text]
    assert [segs[i]["num_blocks"] for i in ids] == [3, 2, -(-n_text // BS)]
    assert [segs[i]["name"] for i in ids] == ["first", "second", "text"]
    assert [segs[i]["num_hits"] for i in ids] == [0, 0, 0]
    assert llm.engine.pool.num_pinned_blocks == 5 + -(-n_text // BS)

    for k in range(1, 4):
        m = ask(llm, kb[0], lead=f"Question {k}:")
        assert m.num_segment_hit_tokens == 40 and m.num_prefix_hit_tokens == 0
        assert listing(llm)[ids[0]]["num_hits"] == k
    m = ask(llm, kb[1], kb[0], lead="Both:")
    assert m.num_segment_hit_tokens == 63
    assert [listing(llm)[i]["num_hits"] for i in ids] == [4, 1, 0]
    text_hit = llm.generate([["About it:", Segment(text_doc), "?"]], ONE, reuse="naive")[0]
    assert text_hit.metrics.num_segment_hit_tokens == n_text
    assert listing(llm)[ids[2]]["num_hits"] == 1

    assert llm.cache_segments([kb[0]]) == [ids[0]]  # pinning again: the same id, no new entry
    assert len(llm.list_segments()) == 3
    assert llm.list_segments(namespace="other") == []

    assert llm.uncache_segments([ids[0], "seg-unknown"]) == 1
    assert list(listing(llm)) == ids[1:]
    assert llm.engine.pool.num_pinned_blocks == 2 + -(-n_text // BS)
    # Unpinned KV stays cached until evicted.
    assert ask(llm, kb[0], lead="After:").num_segment_hit_tokens == 40
    assert llm.uncache_segments(ids[1:]) == 2
    assert llm.list_segments() == [] and llm.engine.pool.num_pinned_blocks == 0
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks


def test_pinned_segments_keep_their_namespace(llama: Any) -> None:
    llm = make_llm(llama, num_blocks=64)
    (doc,) = docs_of(llm, 33)
    (sid,) = llm.cache_segments([doc], namespace="tenant-a")
    assert [s["namespace"] for s in llm.list_segments()] == ["tenant-a"]
    assert [s["id"] for s in llm.list_segments(namespace="tenant-a")] == [sid]
    assert ask(llm, doc, namespace="tenant-b").num_segment_hit_tokens == 0
    assert ask(llm, doc, lead="Again:", namespace="tenant-a").num_segment_hit_tokens == 33
    assert listing(llm)[sid]["num_hits"] == 1


def test_pinned_survive_lru_pressure_until_high_water(llama: Any) -> None:
    llm = make_llm(llama, num_blocks=40, high_water=0.5)
    assert llm.engine.pool.high_water_blocks == 20
    popular, rare = docs_of(llm, 40, 40)
    pid, rid = llm.cache_segments([popular, rare])
    assert llm.engine.pool.num_pinned_blocks == 6
    for k in range(3):
        ask(llm, popular, lead=f"Popular {k}:")
    ask(llm, rare, lead="Rare:")
    assert [listing(llm)[i]["num_hits"] for i in (pid, rid)] == [3, 1]

    # LRU churn: many requests with new documents recycle every free block; pins hold.
    filler = llm.tokenizer.encode(topics["calls"])
    assert len(filler) >= 30 * 60
    for i in range(30):
        ask(llm, filler[60 * i : 60 * i + 60], lead=f"Churn {i}:")
    assert llm.engine.cache.segments.missing_blocks(filler[:60], "") != []  # the churn was evicted
    assert llm.engine.pool.num_pinned_blocks == 6 and set(listing(llm)) == {pid, rid}
    assert ask(llm, rare, lead="Rare again:").num_segment_hit_tokens == 40
    assert ask(llm, popular, lead="Popular again:").num_segment_hit_tokens == 40
    assert [listing(llm)[i]["num_hits"] for i in (pid, rid)] == [4, 2]

    def big_request(num_blocks: int) -> None:
        ids = filler[: num_blocks * BS - 2]  # prompt + 2 new tokens fill exactly num_blocks blocks
        out = llm.generate([ids], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                           reuse={"method": "none", "register": False})[0]
        assert out.finish_reason == "length"

    big_request(14)  # 6 pinned + 14 = 20 blocks in use: at the mark, nothing is dropped
    assert set(listing(llm)) == {pid, rid} and llm.engine.pool.num_pinned_blocks == 6
    big_request(15)  # 21 > 20: the least-used pinned segment goes, and only it
    assert set(listing(llm)) == {pid} and llm.engine.pool.num_pinned_blocks == 3
    assert ask(llm, popular, lead="Still here:").num_segment_hit_tokens == 40
    big_request(18)  # 3 + 18 > 20: the last one goes too
    assert llm.list_segments() == [] and llm.engine.pool.num_pinned_blocks == 0
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks


def test_pinned_segment_hits_through_a_full_pool(llama: Any) -> None:
    """A pinned document hits every time while unpinned traffic fills the rest of a small pool."""
    llm = make_llm(llama, num_blocks=12)
    warm, *stream = docs_of(llm, 30, *[20] * 60)
    (sid,) = llm.cache_segments([warm])
    for i, doc in enumerate(stream):
        m = ask(llm, warm, doc, lead=f"Q{i}")
        assert m.num_segment_hit_tokens == 30, i
        assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks - llm.engine.pool.num_pinned_blocks == 10
    assert listing(llm)[sid]["num_hits"] == len(stream)
