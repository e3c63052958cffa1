"""Block hashes a router recomputes from token ids: vLLM's ``sha256_cbor`` scheme (vLLM 0.33).

vLLM (``vllm/v1/core/kv_cache_utils.py``, ``--prefix-caching-hash-algo sha256_cbor``) hashes a
block as ``sha256(cbor((parent, tuple(token_ids), extra_keys)))`` with canonical CBOR, ``parent``
being the previous block's 32-byte hash, or ``NONE_HASH = sha256(cbor(seed))`` for a chain's first
block, ``seed`` = ``PYTHONHASHSEED``, else ``"vllm-none-hash"``; ``extra_keys`` is None or a tuple
of tagged keys (a ``cache_salt`` enters the first block's as ``("cache_salt", salt)``). Events
carry ``int.from_bytes(hash[-8:], "big")`` (vLLM's ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``).

    prefix block i      h_i = sha256(cbor((h_{i-1} or NONE_HASH, (t..), extra_i)))
                        extra_0 = (("cache_salt", namespace),) when the namespace is not "", else None;
                        extra_i>0 = None -> the ints a vLLM replica with the same seed publishes
    segment block       g   = sha256(cbor((NONE_HASH, (t..), ("sparsex:segment",))))        namespace ""
                        g   = sha256(cbor((NONE_HASH, (t..), ("sparsex:segment", ("cache_salt", ns)))))
                        not chained: one block's hash needs only its own tokens, so a router finds
                        it at any offset of a prompt (and it never equals a prefix hash)

The internal pool hashes (``sparsex.cache.hashing``, BLAKE2b with the model id) are not these: a
router must not need the model id, and vLLM's scheme needs no SparseX code to recompute.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence
from typing import Any

SEGMENT_KEY = "sparsex:segment"
"""The extra key that marks a segment block's hash (and makes it differ from any prefix hash)."""
DEFAULT_SEED = "vllm-none-hash"
"""vLLM's NONE_HASH seed for sha256 / sha256_cbor when ``PYTHONHASHSEED`` is not set."""


def _head(major: int, n: int) -> bytes:
    """A CBOR item head: major type + the shortest encoding of ``n`` (canonical, RFC 8949 4.2.1)."""
    if n < 24:
        return bytes([major << 5 | n])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | info]) + struct.pack(fmt, n)
    raise ValueError(f"integer {n} does not fit CBOR's 64 bits")


def cbor(obj: Any) -> bytes:
    """Canonical CBOR of None, bools, ints, bytes, str and tuples / lists of them (what block
    hashes are made of); equal to ``cbor2.dumps(obj, canonical=True)`` for these types."""
    if obj is None:
        return b"\xf6"
    if obj is True or obj is False:
        return b"\xf5" if obj else b"\xf4"
    if isinstance(obj, int):
        return _head(0, obj) if obj >= 0 else _head(1, -1 - obj)
    if isinstance(obj, bytes):
        return _head(2, len(obj)) + obj
    if isinstance(obj, str):
        data = obj.encode("utf-8")
        return _head(3, len(data)) + data
    if isinstance(obj, tuple | list):
        return _head(4, len(obj)) + b"".join(cbor(item) for item in obj)
    raise TypeError(f"cannot CBOR-encode {type(obj).__name__}")


def sha256_cbor(obj: Any) -> bytes:
    """vLLM's ``sha256_cbor``: SHA-256 of the canonical CBOR of ``obj``."""
    return hashlib.sha256(cbor(obj)).digest()


@functools.lru_cache(maxsize=16384)
def block_hash(parent: bytes, token_ids: tuple[int, ...], extra_keys: tuple[Any, ...] | None) -> bytes:
    """One block's 32-byte hash (cached: a chain is rehashed from its start on every publish)."""
    return sha256_cbor((parent, token_ids, extra_keys))


def external(digest: bytes) -> int:
    """The int a KV event carries for a 32-byte block hash (its last 8 bytes, big-endian)."""
    return int.from_bytes(digest[-8:], "big")


class BlockHasher:
    """vLLM-compatible hashes of prefix and segment blocks for one ``seed`` (= vLLM's PYTHONHASHSEED)."""

    def __init__(self, seed: str) -> None:
        self.seed = seed
        self.none_hash = sha256_cbor(seed)

    def prefix_chain(self, token_ids: Sequence[int], block_size: int, namespace: str) -> list[bytes]:
        """Hashes of every full block of ``token_ids``, chained from the first token."""
        out: list[bytes] = []
        parent = self.none_hash
        for i in range(len(token_ids) // block_size):
            extra = (("cache_salt", namespace),) if i == 0 and namespace else None
            parent = block_hash(parent, tuple(token_ids[i * block_size : (i + 1) * block_size]), extra)
            out.append(parent)
        return out

    def segment_block(self, token_ids: Sequence[int], namespace: str) -> bytes:
        """The hash of one segment block (its own tokens only)."""
        extra = (SEGMENT_KEY, ("cache_salt", namespace)) if namespace else (SEGMENT_KEY,)
        return block_hash(self.none_hash, tuple(token_ids), extra)
