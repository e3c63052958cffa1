"""A KV event subscriber written from vLLM's documented message layout, not from our classes.

The structs follow ``vllm/distributed/kv_events.py`` and ``examples/features/kv_events/
kv_events_subscriber.py`` (vLLM after PR #42892: the batch is an array, each event a map tagged
``"type"``), including the optional fields vLLM added later; ``forbid_unknown_fields`` makes a test
fail if we ever send a field vLLM does not define. Hashes are recomputed here from vLLM's formula
with ``cbor2`` (vLLM's own CBOR library), independently of ``sparsex.kvevents.hashing``.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
import msgspec
import zmq

ExternalBlockHash = bytes | int


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True, forbid_unknown_fields=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


DECODER = msgspec.msgpack.Decoder(type=KVEventBatch)
END_SEQ = -1


# ----- vLLM's block hash (sha256_cbor), recomputed independently -------------------------------


def sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def to_int(digest: bytes) -> int:
    return int.from_bytes(digest, "big") & ((1 << 64) - 1)


DEFAULT_SEED = "vllm-none-hash"  # vLLM 0.33's NONE_HASH seed without PYTHONHASHSEED


def vllm_prefix_hashes(token_ids: Sequence[int], block_size: int, seed: str = DEFAULT_SEED,
                       cache_salt: str | None = None) -> list[int]:
    """vLLM's hash_block_tokens chain over full blocks; the salt, tagged, in the first block's
    extra keys (``generate_block_hash_extra_keys``)."""
    parent, out = sha256_cbor(seed), []
    for i in range(len(token_ids) // block_size):
        extra = (("cache_salt", cache_salt),) if i == 0 and cache_salt else None
        parent = sha256_cbor((parent, tuple(token_ids[i * block_size : (i + 1) * block_size]), extra))
        out.append(to_int(parent))
    return out


def segment_hashes(token_ids: Sequence[int], block_size: int, seed: str = DEFAULT_SEED,
                   namespace: str = "") -> list[int]:
    """The documented segment-block hash: each full block alone, as a chain's first block, with the
    extra keys ("sparsex:segment",), plus ("cache_salt", namespace) when there is a namespace."""
    root, out = sha256_cbor(seed), []
    for i in range(len(token_ids) // block_size):
        extra = ("sparsex:segment", ("cache_salt", namespace)) if namespace else ("sparsex:segment",)
        out.append(to_int(sha256_cbor((root, tuple(token_ids[i * block_size : (i + 1) * block_size]), extra))))
    return out


# ----- the subscriber ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ReplicaView:
    """What a router believes one replica holds, per medium, from the events alone."""

    live: dict[str, set[int]] = field(default_factory=dict)
    tokens: dict[int, list[int]] = field(default_factory=dict)

    def apply(self, event: Any) -> None:
        if isinstance(event, AllBlocksCleared):
            self.live.clear()
        elif isinstance(event, BlockStored):
            assert event.medium is not None
            self.live.setdefault(event.medium, set()).update(int(h) for h in event.block_hashes)  # type: ignore[arg-type]
            bs = event.block_size
            for i, h in enumerate(event.block_hashes):
                self.tokens[int(h)] = event.token_ids[i * bs : (i + 1) * bs]  # type: ignore[arg-type]
        elif isinstance(event, BlockRemoved):
            held = self.live.setdefault(str(event.medium), set())
            for h in event.block_hashes:
                assert h in held, f"removed {h} from {event.medium}, which was never announced"
                held.discard(int(h))  # type: ignore[arg-type]

    def gpu(self) -> set[int]:
        return self.live.get("GPU", set())


class Subscriber:
    """SUB on the stream plus a DEALER on the replay socket; fills every gap it sees by replay."""

    def __init__(self, endpoint: str, replay_endpoint: str, topic: str = "") -> None:
        self.ctx = zmq.Context.instance()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.connect(endpoint)
        self.sub.setsockopt_string(zmq.SUBSCRIBE, topic)
        self.replayer = self.ctx.socket(zmq.DEALER)
        self.replayer.setsockopt(zmq.SNDTIMEO, 5000)  # no replay socket up (a restart): fail, never hang
        self.replayer.connect(replay_endpoint)
        self.topic = topic.encode()
        self.last_seq = -1
        self.batches: list[tuple[int, KVEventBatch]] = []
        self.raw: list[bytes] = []
        self.view = ReplicaView()
        self.num_live = 0  # batches that came on the SUB socket (not by replay)

    def close(self) -> None:
        self.sub.close(linger=0)
        self.replayer.close(linger=0)

    def expect_restart(self) -> None:
        """The replica went away (its last batch was AllBlocksCleared): its next stream starts at 0."""
        self.last_seq = -1

    def _take(self, seq: int, payload: bytes) -> None:
        if seq <= self.last_seq:
            return
        batch = DECODER.decode(payload)
        self.batches.append((seq, batch))
        self.raw.append(payload)
        for event in batch.events:
            self.view.apply(event)
        self.last_seq = seq

    def replay(self, timeout_ms: int = 5000) -> None:
        """Ask for every batch after the last one taken; read until the end marker (bounded)."""
        self.replayer.send_multipart([b"", (self.last_seq + 1).to_bytes(8, "big")])
        while self.replayer.poll(timeout_ms):
            _, seq_bytes, payload = self.replayer.recv_multipart()
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if seq == END_SEQ:
                return
            self._take(seq, payload)

    def poll(self, timeout_ms: int = 100) -> bool:
        """One message from the stream (a gap before it is replayed first); False if none came."""
        if not self.sub.poll(timeout_ms):
            return False
        topic, seq_bytes, payload = self.sub.recv_multipart()
        assert topic == self.topic
        seq = int.from_bytes(seq_bytes, "big")
        if seq > self.last_seq + 1:
            self.replay()
        if seq > self.last_seq:
            self.num_live += 1
        self._take(seq, payload)
        return True

    def wait_for(self, done: Callable[[], bool], timeout_s: float = 20.0) -> None:
        """Read the stream (and replay when it is quiet) until ``done()``; fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"events not seen in {timeout_s}s; got {self.events()}")
            if not self.poll():
                self.replay()

    def drain(self, quiet_ms: int = 200) -> None:
        """Everything published so far (call after the engine flushed its events)."""
        self.replay()
        while self.poll(quiet_ms):
            pass

    def until_closed(self, timeout_s: float = 20.0) -> None:
        """Read the stream until the replica's last batch (AllBlocksCleared) arrives; its replay
        socket is gone by then, so only the stream is read."""
        deadline = time.monotonic() + timeout_s
        n = len(self.batches)
        while not any(isinstance(e, AllBlocksCleared) for _, b in self.batches[n:] for e in b.events):
            assert time.monotonic() < deadline, "the closing AllBlocksCleared never arrived"
            self.poll(200)

    def events(self) -> list[Any]:
        return [e for _, b in self.batches for e in b.events]
