"""The engine over the tiers: two processes sharing one redis-server, the disk tier, faults, pins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import pytest
import redis
import torch

from sparsex import LLM, SamplingParams, Segment
from sparsex.kv.tier_keys import entry_hash
from sparsex.kv.tiers import TierCache
from sparsex.kvstore import BackgroundWriter, TieredStore
from tests.kvstore.conftest import RedisServer

REPO_ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
FULL = {"method": "none", "register": False}  # the reference: a full prefill, nothing published
POOL = 1 << 24  # KV pool bytes: a few thousand tokens of the tiny model


@pytest.fixture(scope="module")
def model(tiny_model_dir: Any) -> Path:
    return Path(tiny_model_dir("llama"))


def docs(model: Path, *lengths: int) -> list[list[int]]:
    """Distinct documents of real text with the given token lengths (tokenized by the tiny model)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(model))(topics["class"] + topics["assert"])["input_ids"]
    out, at = [], 0
    for n in lengths:
        out.append(list(ids[at : at + n]))
        at += n
    assert [len(d) for d in out] == list(lengths)
    return out


def run_replica(tmp_path: Path, name: str, model: Path, llm: dict[str, Any], steps: list[dict[str, Any]]) -> list[Any]:
    """Run ``steps`` in a fresh engine process; its results, one per step."""
    job, out = tmp_path / f"{name}.json", tmp_path / f"{name}.out.json"
    job.write_text(json.dumps({"model": str(model), "llm": {"kv_cache_memory": POOL, **llm}, "steps": steps}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "tests.kvstore.engine_worker", str(job), str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return list(json.loads(out.read_text()))


def seg(doc: list[int], namespace: str = "") -> dict[str, Any]:
    return {"segment": doc, "namespace": namespace}


def test_a_document_computed_by_replica_a_hits_in_replica_b_bitwise(
    tmp_path: Path, model: Path, redis_server: RedisServer
) -> None:
    (doc,) = docs(model, 120)
    store = {"kv_store": redis_server.url, "kv_store_dtype": "float32"}
    a = run_replica(tmp_path, "a", model, store, [
        {"op": "generate", "prompt": [seg(doc), "What is this about?"], "reuse": "naive"},
        {"op": "dump", "tokens": doc, "out": str(tmp_path / "a.pt")},
    ])
    assert a[0]["num_segment_hit_tokens"] == 0 and a[1]["num_tokens"] == len(doc)
    question = [seg(doc), "Summarize it in one line."]  # the document where A computed it: exact reuse
    b = run_replica(tmp_path, "b", model, store, [
        {"op": "generate", "prompt": question, "reuse": FULL},
        {"op": "generate", "prompt": question, "reuse": "naive"},
        {"op": "dump", "tokens": doc, "out": str(tmp_path / "b.pt")},
    ])
    full, reused, dumped = b
    assert reused["num_promoted"] == 1 and reused["num_segment_hit_tokens"] == len(doc)
    assert reused["num_recomputed_tokens"] < len(doc)
    assert reused["token_ids"] == full["token_ids"]
    kv_a, kv_b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert dumped["num_tokens"] == len(doc) and kv_a["positions"] == kv_b["positions"]
    assert torch.equal(kv_a["k"], kv_b["k"]) and torch.equal(kv_a["v"], kv_b["v"])  # bitwise


def test_restarted_replica_restores_a_pinned_knowledge_base(
    tmp_path: Path, model: Path, redis_server: RedisServer
) -> None:
    kb = docs(model, 70, 45)
    store = {"kv_store": redis_server.url, "kv_store_dtype": "float32"}
    (pinned,) = run_replica(tmp_path, "a", model, store, [{"op": "pin", "docs": kb, "namespace": "kb"}])
    listing, answer = run_replica(tmp_path, "restarted", model, store, [
        {"op": "segments"},
        {"op": "generate", "prompt": ["Q:", seg(kb[1], "kb"), "?"], "reuse": {"method": "naive", "namespace": "kb"}},
    ])
    assert sorted(s["id"] for s in listing["segments"]) == sorted(pinned["segment_ids"])
    assert answer["num_promoted"] == 0  # restored at construction, not looked up
    assert answer["num_segment_hit_tokens"] == len(kb[1])


def engine(model: Path, **kw: Any) -> LLM:
    return LLM(model=str(model), kv_cache_memory=POOL, kv_store_dtype="float32", **kw)


def test_namespaces_stay_isolated_in_redis(model: Path, redis_server: RedisServer) -> None:
    (doc,) = docs(model, 64)
    with engine(model, kv_store=redis_server.url) as a:
        a.generate([[Segment(doc, "t1"), "Tell me."]], GREEDY, reuse={"method": "naive", "namespace": "t1"})
    with engine(model, kv_store=redis_server.url) as b:
        other = b.generate([[Segment(doc, "t2"), "Tell me."]], GREEDY, reuse={"method": "naive", "namespace": "t2"})
        assert other[0].metrics.num_segment_hit_tokens == 0 and b.engine.tiers is not None
        assert b.engine.tiers.stats.num_promoted == 0
        own = b.generate([[Segment(doc, "t1"), "Tell me."]], GREEDY, reuse={"method": "naive", "namespace": "t1"})
        assert own[0].metrics.num_segment_hit_tokens == len(doc)


def test_two_tenants_holding_one_document_share_no_store_name(model: Path, redis_server: RedisServer) -> None:
    """Content hashes are keyed by the namespace: nothing in Redis's key names says that two tenants
    hold the same text. Pinned under both, it is restored for both after a restart."""
    (doc,) = docs(model, 64)
    tenants = ("alice/", "bob/")
    with engine(model, kv_store=redis_server.url) as a:
        for ns in tenants:
            a.generate([[Segment(doc, ns), "Tell me."]], GREEDY, reuse={"method": "naive", "namespace": ns})
            a.cache_segments([doc], namespace=ns + "kb")
    names = [k.decode() for k in redis.Redis.from_url(redis_server.url).keys("sparsex:*")]
    by_tag: dict[str, set[str]] = {}
    for name in names:
        tag, _, content = name.rpartition(":")
        by_tag.setdefault(tag, set()).add(content)
    assert len(by_tag) == 5  # 2 namespaces x (published + pinned) + the pins manifest
    contents = [c for tag_contents in by_tag.values() for c in tag_contents]
    assert len(contents) == len(set(contents))  # no content hash appears under two namespaces
    with engine(model, kv_store=redis_server.url) as b:  # a restart
        assert sorted(s["namespace"] for s in b.list_segments()) == ["alice/kb", "bob/kb"]
        for ns in tenants:
            out = b.generate([["Q:", Segment(doc, ns + "kb"), "?"]], GREEDY,
                             reuse={"method": "naive", "namespace": ns + "kb"})[0]
            assert out.metrics.num_segment_hit_tokens == len(doc)
        assert b.engine.tiers is not None and b.engine.tiers.stats.num_promoted == 2  # the two restored pins


def test_a_corrupt_value_is_rejected_and_recomputed(model: Path, redis_server: RedisServer) -> None:
    (doc,) = docs(model, 64)
    prompt = [[Segment(doc), "Tell me."]]
    with engine(model, kv_store=redis_server.url) as a:
        a.generate(prompt, GREEDY, reuse="naive")
        assert a.engine.tiers is not None
        key = a.engine.tiers.entries()[0]["key"]
    client = redis.Redis.from_url(redis_server.url)
    value = bytearray(client.get(key))
    value[len(value) // 2] ^= 0xFF  # one flipped byte in the K/V
    client.set(key, bytes(value))
    with engine(model, kv_store=redis_server.url) as b:
        want = b.generate(prompt, GREEDY, reuse=FULL)[0].token_ids
        got = b.generate(prompt, GREEDY, reuse="naive")[0]
        assert b.engine.tiers is not None and b.engine.tiers.stats.num_promoted == 0
        assert got.metrics.num_segment_hit_tokens == 0 and got.token_ids == want
    assert client.get(key) not in (None, bytes(value))  # the bad copy was replaced by B's recompute
    client.close()


def test_requests_succeed_while_redis_is_killed(model: Path, redis_server: RedisServer) -> None:
    d1, d2 = docs(model, 64, 64)
    with engine(model, kv_store=redis_server.url) as llm:
        llm.generate([[Segment(d1), "One."]], GREEDY, reuse="naive")
        redis_server.kill()
        for doc in (d1, d2):
            prompt = [[Segment(doc), "Two."]]
            want = llm.generate(prompt, GREEDY, reuse=FULL)[0].token_ids
            assert llm.generate(prompt, GREEDY, reuse="naive")[0].token_ids == want
    with engine(model, kv_store=redis_server.url) as fresh:  # still down: every request recomputes
        prompt = [[Segment(d2), "Three."]]
        assert fresh.generate(prompt, GREEDY, reuse="naive")[0].metrics.num_segment_hit_tokens == 0


def test_the_disk_tier_spills_within_its_budget_and_comes_back(model: Path, tmp_path: Path) -> None:
    d1, d2, d3 = docs(model, 64, 64, 64)
    disk = str(tmp_path / "disk")
    with engine(model, kv_disk=disk, kv_disk_bytes=1 << 30) as probe:
        probe.generate([[Segment(d1), "?"]], GREEDY, reuse="naive")
    entry_bytes = sum(p.stat().st_size for p in Path(disk).iterdir() if p.stat().st_size > 1000)
    budget = int(2.5 * entry_bytes) + 20_000  # two entries (and their small index records), not three
    for p in Path(disk).iterdir():
        p.unlink()
    with engine(model, kv_disk=disk, kv_disk_bytes=budget) as a:
        for i, doc in enumerate((d1, d2, d3)):
            a.generate([[Segment(doc), f"Question {i}?"]], GREEDY, reuse="naive")
    assert sum(p.stat().st_size for p in Path(disk).iterdir()) <= budget
    with engine(model, kv_disk=disk, kv_disk_bytes=budget) as b:
        hits = [b.generate([[Segment(doc), "Again?"]], GREEDY, reuse="naive")[0].metrics.num_segment_hit_tokens
                for doc in (d3, d1)]
    assert hits == [len(d3), 0]  # the newest came back; the oldest was evicted


class BlockedTier:
    """A tier whose writes wait until released: the writer thread is stuck in it."""

    name = "blocked"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.num_puts = 0

    def get(self, key: str) -> bytes | None:
        return None

    def get_many(self, keys: Any) -> list[bytes | None]:
        return [None] * len(keys)

    def put(self, key: str, value: bytes) -> bool:
        self.release.wait()
        self.num_puts += 1
        return True

    def delete(self, key: str) -> None: ...

    def contains(self, key: str) -> bool:
        return False

    def close(self) -> None: ...


def test_the_write_queue_never_blocks_a_request(model: Path, tmp_path: Path) -> None:
    many = docs(model, *([40] * 6))
    with engine(model, kv_disk=str(tmp_path / "disk")) as llm:
        assert llm.engine.tiers is not None
        tier = BlockedTier()
        store = TieredStore([tier])
        writer = BackgroundWriter(store, max_pending=2)
        llm.engine.tiers = TierCache(llm.engine.store, llm.engine.tiers.fingerprint, store, llm.engine.tiers.options, writer)
        outs = [llm.generate([[Segment(d), "Go."]], GREEDY, reuse="naive")[0] for d in many]
        assert all(o.finish_reason == "length" for o in outs)  # all served while every write waits
        assert writer.num_dropped >= len(many) - 3  # one in the thread, two queued, the rest dropped
        tier.release.set()
        assert writer.flush(timeout=30)
        writer.close()
    assert tier.num_puts > 0


def test_entries_list_what_the_pool_holds(model: Path, tmp_path: Path) -> None:
    (doc,) = docs(model, 48)
    with engine(model, kv_disk=str(tmp_path / "disk")) as llm:
        llm.generate([[Segment(doc, "t"), "?"]], GREEDY, reuse={"method": "naive", "namespace": "t"})
        (entry,) = llm.cache_entries("t")
        assert entry["key"].endswith(entry_hash(doc, "t")) and entry["num_tokens"] == len(doc)
        assert llm.cache_entries("other") == []
        assert [e.kind for e in llm.engine.tiers.events_since(0)] == ["published"]  # type: ignore[union-attr]


def test_a_run_at_any_offset_of_a_plain_prompt_is_promoted(model: Path, tmp_path: Path) -> None:
    doc, other = docs(model, 100, 30)
    disk = str(tmp_path / "disk")
    with engine(model, kv_disk=disk) as a:
        a.generate([[Segment(doc), "?"]], GREEDY, reuse="naive")
    plain = other + doc[7:95] + other[:5]  # no segment marks: a middle run of the entry, elsewhere
    with engine(model, kv_disk=disk) as b:
        out = b.generate([plain], GREEDY, reuse="naive")[0]
        assert b.engine.tiers is not None and b.engine.tiers.stats.num_promoted == 1
        assert out.metrics.num_segment_hit_tokens == 88  # admission's any-offset lookup found the run


def test_a_redis_hit_is_copied_into_the_disk_tier(model: Path, tmp_path: Path, redis_server: RedisServer) -> None:
    (doc,) = docs(model, 80)
    prompt = [[Segment(doc), "Why?"]]
    with engine(model, kv_store=redis_server.url) as a:
        a.generate(prompt, GREEDY, reuse="naive")
    disk = str(tmp_path / "disk")
    with engine(model, kv_store=redis_server.url, kv_disk=disk) as b:
        assert b.generate(prompt, GREEDY, reuse="naive")[0].metrics.num_segment_hit_tokens == len(doc)
        assert b.engine.tiers is not None and set(b.engine.tiers.stats.bytes_by_tier) == {"redis"}
    redis_server.kill()
    with engine(model, kv_disk=disk) as c:  # the disk alone now serves it, block index included
        assert c.generate(prompt, GREEDY, reuse="naive")[0].metrics.num_segment_hit_tokens == len(doc)
        assert c.engine.tiers is not None and set(c.engine.tiers.stats.bytes_by_tier) == {"disk"}


def test_a_slow_redis_costs_a_bounded_wait_and_a_recompute(model: Path, redis_server: RedisServer) -> None:
    (doc,) = docs(model, 64)
    prompt = [[Segment(doc), "Slow?"]]
    with engine(model, kv_store=redis_server.url) as a:
        a.generate(prompt, GREEDY, reuse="naive")
    redis_server.pause()  # accepts connections, never answers: every call ends at its timeout
    try:
        with engine(model, kv_store=redis_server.url) as b:
            want = b.generate(prompt, GREEDY, reuse=FULL)[0].token_ids
            got = b.generate(prompt, GREEDY, reuse="naive")[0]
            assert got.metrics.num_segment_hit_tokens == 0 and got.token_ids == want
    finally:
        redis_server.resume()
