"""Store keys: which model, which tenant, which content.

    sparsex:{<fingerprint hash>.<namespace hash>}:<content hash>
            └──────────── hash tag ────────────┘
    e.g.  sparsex:{3f9c0a1b2c3d4e5f.9a8b7c6d5e4f3a2b}:e3b0c44298fc1c149afbf4c8996fb924...

Why the hash tag: Redis Cluster (and Valkey) place a key by the CRC16 of the part between the first
``{`` and ``}``. Every entry one prompt can hit has the same model and namespace, so they all live
in one slot: the engine can fetch a prompt's entries with one MGET or pipeline on one node (a
cross-slot MGET fails with CROSSSLOT) and a tenant's entries can be listed or dropped on one node.
Different tenants and models still spread over the cluster. The price: one tenant of one model is
bounded by one node's memory.

Fingerprint and namespace are hashed (BLAKE2b, 8 bytes) so keys have a fixed length and tenant
names never appear in the store. A collision of those short hashes cannot serve a wrong entry:
the value itself carries the full fingerprint and namespace, and ``decode_entry`` checks them.
"""

from __future__ import annotations

import hashlib
import re

KEY_PREFIX = "sparsex"
_HEX = re.compile(r"[0-9a-f]{1,128}")


def model_fingerprint(weights_id: str, kv_dtype: str, block_size: int) -> str:
    """Identity of the KV a model produces: the same fingerprint means interchangeable entries.

    weights_id: a digest or name+revision of the weights (two replicas must compute it identically).
    kv_dtype: the pool's KV dtype ("float32", ...); block_size: tokens per KV block.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return f"weights={weights_id};kv_dtype={kv_dtype};block_size={block_size}"


def short_hash(text: str) -> str:
    """16 hex chars of BLAKE2b: fixed length, stable across processes and machines."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def entry_key(fingerprint: str, namespace: str, content_hash: str) -> str:
    """The store key of one entry (see the module docstring for the layout)."""
    if not _HEX.fullmatch(content_hash):
        raise ValueError(f"content hash must be 1-128 lowercase hex chars, got {content_hash!r}")
    return key_prefix(fingerprint, namespace) + content_hash


def key_prefix(fingerprint: str, namespace: str) -> str:
    """``entry_key`` without the content hash: build many keys of one model and namespace at once
    (the caller appends lowercase hex content hashes)."""
    return f"{KEY_PREFIX}:{{{short_hash(fingerprint)}.{short_hash(namespace)}}}:"
