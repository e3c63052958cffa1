"""The KV event wire format: vLLM's ``vllm/distributed/kv_events.py`` messages, as msgpack.

Matched against vLLM 0.33.0 (``vllm/distributed/kv_events.py`` of its wheel; events have been
tagged maps since vllm-project/vllm#42892) and the example subscriber on vLLM's main,
``examples/features/kv_events/kv_events_subscriber.py``::

    ZMQ PUB multipart:  [topic (utf-8), seq (8 bytes, big-endian, from 0), payload]
    payload (msgpack):  [ts, [event, ...], data_parallel_rank]             EventBatch, an array
    event (a map, tagged by "type"; None-valued fields after medium/lora_name are left out):
      {"type": "BlockStored", "block_hashes": [u64, ...], "parent_block_hash": u64 | nil,
       "token_ids": [int, ...], "block_size": int, "lora_id": nil, "medium": str, "lora_name": nil,
       "extra_keys": [[...] | nil, ...]}
      {"type": "BlockRemoved", "block_hashes": [u64, ...], "medium": str}
      {"type": "AllBlocksCleared"}

Field names, order and required fields are vLLM's, so its structs decode these unchanged; the
optional fields (group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window, locality, ownership,
session_id, lookahead_token_ids) are not sent and decode as their defaults (None).
"""

from __future__ import annotations

from typing import Any

import msgspec

MEDIUM_POOL = "GPU"
"""The engine's KV pool (vLLM's ``MEDIUM_GPU``, the label routers read as "this replica holds it";
used whatever the device, CPU included)."""
MEDIUM_DISK = "DISK"
"""This replica's local-disk tier (``--kv-disk``)."""
MEDIUM_REDIS = "REDIS"
"""The Redis tier every replica shares (``--kv-store``): any replica can load these blocks."""
TIER_MEDIUM = {"disk": MEDIUM_DISK, "redis": MEDIUM_REDIS}
"""``TieredStore`` tier name -> medium."""


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """A change to what a replica caches (a map tagged ``"type": <class name>``)."""


class BlockStored(KVCacheEvent):
    """Blocks now cached in ``medium``; ``token_ids`` is every block's tokens in order (or empty)."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None


class BlockRemoved(KVCacheEvent):
    """Blocks no longer cached in ``medium``."""

    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    """Everything this replica announced is gone (it started, or it is shutting down)."""


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One published message: ``[ts, events, data_parallel_rank]`` (ts: seconds since the epoch)."""

    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None
