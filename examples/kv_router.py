"""A KV-aware router's core, fed by SparseX's KV events (vLLM's format): which replica holds most of
a prompt. Needs only ``pyzmq``, ``msgspec`` and ``cbor2`` (no SparseX, no vLLM).

    replica A ── PUB tcp://a:5557 (+ replay tcp://a:5558) ──┐
                                                            ├─▶ KVRouter: per replica {medium: {block hash}}
    replica B ── PUB tcp://b:5557 (+ replay tcp://b:5558) ──┘        └─▶ score(prompt token ids) ─▶ pick

Scores, in prompt tokens (block size B, hashes as ``docs/DEPLOYMENT.md`` documents them):
    prefix   the prompt's leading full blocks whose vLLM chain hashes the replica holds in its pool
             ("GPU"): reused exactly, nothing recomputed
    segment  tokens after that prefix covered by a B-token window, at any offset, whose segment
             hash the replica holds in its pool: reused and repaired (a small share recomputed)
    shared   tokens covered by windows held in Redis ("REDIS"): any replica loads them (a load,
             not a recompute), so they count for every replica, less
Pick = the highest ``prefix + 0.8 * segment + 0.3 * shared``; a production router would weigh in
each replica's load (queue length, KV usage) too.

    python examples/kv_router.py --replica a=tcp://127.0.0.1:5557,tcp://127.0.0.1:5558 \\
        --replica b=tcp://127.0.0.1:5567,tcp://127.0.0.1:5568 --tokenizer HuggingFaceTB/SmolLM2-135M-Instruct
    # then type prompts (one per line): prints each replica's score and the pick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import cbor2
import msgspec
import zmq


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int | bytes]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


_DECODE = msgspec.msgpack.Decoder(type=KVEventBatch)
SEGMENT_KEY = "sparsex:segment"


def _sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _int(digest: bytes) -> int:
    return int.from_bytes(digest[-8:], "big")


@dataclass
class Score:
    prefix: int = 0
    segment: int = 0
    shared: int = 0

    @property
    def total(self) -> float:
        return self.prefix + 0.8 * self.segment + 0.3 * self.shared


@dataclass
class Replica:
    """One replica's stream and what it announced, per medium."""

    name: str
    sub: zmq.Socket[bytes]
    replay: zmq.Socket[bytes] | None
    last_seq: int = -1
    live: dict[str, set[int]] = field(default_factory=dict)

    def apply(self, seq: int, payload: bytes) -> None:
        for event in _DECODE.decode(payload).events:
            if isinstance(event, AllBlocksCleared):
                self.live.clear()
            elif isinstance(event, BlockStored):
                self.live.setdefault(event.medium or "GPU", set()).update(int(h) for h in event.block_hashes)
            else:
                self.live.get(event.medium or "GPU", set()).difference_update(int(h) for h in event.block_hashes)
        self.last_seq = seq


class KVRouter:
    """Subscribes to every replica's KV events and scores prompts against what each one holds."""

    def __init__(self, replicas: dict[str, tuple[str, str | None]], block_size: int = 16, seed: str = "vllm-none-hash",
                 topic: str = "") -> None:
        """``replicas``: name -> (PUB endpoint, replay endpoint or None); ``seed``: the replicas'
        ``--kv-events-hash-seed`` (vLLM's PYTHONHASHSEED); ``topic``: their ``--kv-events-topic``."""
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.block_size = block_size
        self.none_hash = _sha256_cbor(seed)
        self.poller = zmq.Poller()
        self.replicas: dict[str, Replica] = {}
        for name, (endpoint, replay_endpoint) in replicas.items():
            sub = self.ctx.socket(zmq.SUB)
            sub.connect(endpoint)
            sub.setsockopt_string(zmq.SUBSCRIBE, topic)
            replay = None
            if replay_endpoint is not None:
                replay = self.ctx.socket(zmq.DEALER)
                replay.setsockopt(zmq.SNDTIMEO, 1000)
                replay.connect(replay_endpoint)
            self.replicas[name] = Replica(name, sub, replay)
            self.poller.register(sub, zmq.POLLIN)

    # ----- following the streams ------------------------------------------------------------------

    def poll(self, timeout_ms: int = 100) -> int:
        """Apply the batches that arrive within ``timeout_ms``; returns how many."""
        n = 0
        for sock, _ in self.poller.poll(timeout_ms):
            replica = next(r for r in self.replicas.values() if r.sub is sock)
            _, seq_bytes, payload = replica.sub.recv_multipart()
            seq = int.from_bytes(seq_bytes, "big")
            if seq <= replica.last_seq:  # the replica restarted: a new stream (it starts with a clear)
                replica.last_seq = -1
            if seq > replica.last_seq + 1:
                self.catch_up(replica.name)
            if seq > replica.last_seq:
                replica.apply(seq, payload)
                n += 1
        return n

    def catch_up(self, name: str, timeout_ms: int = 1000) -> None:
        """Ask a replica's replay socket for the batches after the last one applied."""
        replica = self.replicas[name]
        if replica.replay is None:
            return
        try:
            replica.replay.send_multipart([b"", (replica.last_seq + 1).to_bytes(8, "big")])
        except zmq.Again:
            return
        while replica.replay.poll(timeout_ms):
            _, seq_bytes, payload = replica.replay.recv_multipart()
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if seq < 0:
                return
            if seq > replica.last_seq:
                replica.apply(seq, payload)

    # ----- scoring ---------------------------------------------------------------------------------

    def prefix_hashes(self, token_ids: list[int], namespace: str = "") -> list[int]:
        """vLLM's sha256_cbor chain; the namespace is the first block's cache_salt."""
        bs, parent, out = self.block_size, self.none_hash, []
        for i in range(len(token_ids) // bs):
            extra = (("cache_salt", namespace),) if i == 0 and namespace else None
            parent = _sha256_cbor((parent, tuple(token_ids[i * bs : (i + 1) * bs]), extra))
            out.append(_int(parent))
        return out

    def window_hashes(self, token_ids: list[int], namespace: str = "") -> list[int]:
        """The segment hash of the B-token window at every offset."""
        bs = self.block_size
        extra = (SEGMENT_KEY, ("cache_salt", namespace)) if namespace else (SEGMENT_KEY,)
        return [_int(_sha256_cbor((self.none_hash, tuple(token_ids[o : o + bs]), extra)))
                for o in range(len(token_ids) - bs + 1)]

    def score(self, token_ids: list[int], namespace: str = "") -> dict[str, Score]:
        """Each replica's score for a prompt (``namespace``: the engine namespace of the request,
        ``<tenant>/<cache_salt>`` with API keys; ``""`` without keys and salt)."""
        bs = self.block_size
        chain, windows = self.prefix_hashes(token_ids, namespace), self.window_hashes(token_ids, namespace)
        redis = set().union(*(r.live.get("REDIS", set()) for r in self.replicas.values()))
        out = {}
        for name, r in self.replicas.items():
            gpu = r.live.get("GPU", set())
            n_prefix = next((i for i, h in enumerate(chain) if h not in gpu), len(chain))
            in_pool, in_redis = [False] * len(token_ids), [False] * len(token_ids)
            for o, h in enumerate(windows):
                if h in gpu:
                    in_pool[o : o + bs] = [True] * bs
                elif h in redis:
                    in_redis[o : o + bs] = [True] * bs
            start = n_prefix * bs
            segment = sum(in_pool[start:])
            shared = sum(1 for p, s in zip(in_pool[start:], in_redis[start:], strict=True) if s and not p)
            out[name] = Score(start, segment, shared)
        return out

    def pick(self, token_ids: list[int], namespace: str = "") -> str:
        scores = self.score(token_ids, namespace)
        return max(scores, key=lambda name: scores[name].total)

    def close(self) -> None:
        for r in self.replicas.values():
            r.sub.close(linger=0)
            if r.replay is not None:
                r.replay.close(linger=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replica", action="append", required=True, metavar="NAME=PUB[,REPLAY]")
    p.add_argument("--tokenizer", default=None, help="tokenize prompt lines with this HF tokenizer "
                                                     "(else each line is a JSON list of token ids)")
    p.add_argument("--namespace", default="", help="engine namespace of the prompts")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", default="vllm-none-hash", help="the replicas' --kv-events-hash-seed")
    p.add_argument("--topic", default="")
    args = p.parse_args(argv)
    replicas = {}
    for spec in args.replica:
        name, _, eps = spec.partition("=")
        pub, _, replay = eps.partition(",")
        replicas[name] = (pub, replay or None)
    router = KVRouter(replicas, args.block_size, args.seed, args.topic)
    for name in replicas:
        router.catch_up(name)
    encode = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        encode = AutoTokenizer.from_pretrained(args.tokenizer).encode
    print("prompts, one per line:", file=sys.stderr)
    for line in sys.stdin:
        while router.poll(50):
            pass
        ids = encode(line.rstrip("\n")) if encode else json.loads(line)
        scores = router.score(ids, args.namespace)
        for name, s in scores.items():
            print(f"{name}: prefix {s.prefix} segment {s.segment} shared {s.shared} -> {s.total:.1f}")
        print("pick:", max(scores, key=lambda n: scores[n].total), flush=True)
    router.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
