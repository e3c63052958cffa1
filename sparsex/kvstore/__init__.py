"""Tiered KV store below the KV pool: local disk and Redis, one entry per cached segment.

Layer map (see README.md): engine -> TieredStore -> DiskTier / RedisTier, BackgroundWriter for
writes, codec for the value format. Nothing here imports the engine, the model runner or the server.
"""

from sparsex.kvstore.codec import (
    CorruptEntry,
    EntryExpectation,
    EntryMismatch,
    EntryRejected,
    KVEntry,
    StorageDtype,
    decode_entry,
    encode_entry,
)
from sparsex.kvstore.disk import DiskTier
from sparsex.kvstore.keys import entry_key, model_fingerprint
from sparsex.kvstore.metrics import StoreMetrics
from sparsex.kvstore.redis_tier import RedisTier
from sparsex.kvstore.tiers import LoadedEntry, StoreHit, StoreListener, Tier, TieredStore
from sparsex.kvstore.writer import BackgroundWriter

__all__ = [
    "BackgroundWriter",
    "CorruptEntry",
    "DiskTier",
    "EntryExpectation",
    "EntryMismatch",
    "EntryRejected",
    "KVEntry",
    "LoadedEntry",
    "RedisTier",
    "StorageDtype",
    "StoreHit",
    "StoreListener",
    "StoreMetrics",
    "Tier",
    "TieredStore",
    "decode_entry",
    "encode_entry",
    "entry_key",
    "model_fingerprint",
]
