"""Chained block hashes over token ids (pure Python, deterministic across processes).

A block's hash covers its parent's hash, a salt and its own token ids, so equal
hashes mean "equal content after equal history" (up to collisions, which the
block pool guards against by comparing token ids on every hit):

    salt = (model_id, namespace, domain)         domain: "prefix" or "segment"

    block 0: h0 = H(None, t[0:4],  salt)
    block 1: h1 = H(h0,   t[4:8],  salt)
    block 2: h2 = H(h1,   t[8:10], salt)         a segment's last block may be partial

Every field is length-prefixed before hashing, so no two different inputs
serialize to the same bytes (``("ab", "c")`` vs ``("a", "bc")``, parent vs no
parent, ...).

"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)
"""Hash of one block's content and history; the key of the block pool's cache map."""

HashFn = Callable[[bytes], bytes]
"""Digest function over serialized block content; injectable so tests can force collisions."""

_VERSION_TAG = b"sparsex-block-hash-v1"
_MAX_TOKEN_ID = 2**63 - 1


def default_hash_fn(data: bytes) -> bytes:
    """32-byte BLAKE2b digest: fast, and unlike ``hash()`` identical in every process."""
    return hashlib.blake2b(data, digest_size=32).digest()


def _len_prefixed(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def serialize_block(parent: BlockHash | None, token_ids: Sequence[int], salt: tuple[str, ...]) -> bytes:
    """Unambiguous byte encoding of (parent, salt, token ids), the input of the hash function."""
    if token_ids and (min(token_ids) < 0 or max(token_ids) > _MAX_TOKEN_ID):
        bad = next(t for t in token_ids if not 0 <= t <= _MAX_TOKEN_ID)
        raise ValueError(f"token id {bad} out of range [0, 2**63)")
    return b"".join((
        _VERSION_TAG,
        b"\x00" if parent is None else b"\x01" + _len_prefixed(parent),
        _salt_bytes(salt),
        struct.pack(f">I{len(token_ids)}q", len(token_ids), *token_ids),
    ))


@functools.lru_cache(maxsize=1024)
def _salt_bytes(salt: tuple[str, ...]) -> bytes:
    """The salt's encoding (a handful of distinct salts per process: model x namespace x domain)."""
    return struct.pack(">I", len(salt)) + b"".join(_len_prefixed(item.encode("utf-8")) for item in salt)


def hash_block(
    parent: BlockHash | None,
    token_ids: Sequence[int],
    salt: tuple[str, ...],
    hash_fn: HashFn = default_hash_fn,
) -> BlockHash:
    """Hash of one block given its parent's hash (None for the first block of a chain)."""
    return BlockHash(hash_fn(serialize_block(parent, token_ids, salt)))


def hash_chain(
    token_ids: Sequence[int],
    block_size: int,
    salt: tuple[str, ...],
    hash_fn: HashFn = default_hash_fn,
) -> list[BlockHash]:
    """Chained hashes of every block of ``token_ids`` (the last one partial if the length is not
    a multiple of ``block_size``); callers that want full blocks only pass a truncated list."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hashes: list[BlockHash] = []
    parent: BlockHash | None = None
    for start in range(0, len(token_ids), block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], salt, hash_fn)
        hashes.append(parent)
    return hashes


def walk_chain(
    token_ids: Sequence[int], block_size: int, salt: tuple[str, ...], hash_fn: HashFn,
    lookup: Callable[[BlockHash, Sequence[int]], int | None], partial_last: bool,
) -> list[int]:
    """Block ids of the longest run of leading blocks of ``token_ids`` found by their chained hash.

    ``lookup(hash, tokens)`` returns the block published under ``hash`` holding exactly ``tokens``
    (verified token by token), or None, which ends the walk. ``partial_last``: a last block shorter
    than ``block_size`` is looked up too (segments publish theirs; the prefix cache never does)."""
    end = len(token_ids) if partial_last else len(token_ids) - block_size + 1
    found: list[int] = []
    parent: BlockHash | None = None
    for start in range(0, max(0, end), block_size):
        chunk = token_ids[start : start + block_size]
        parent = hash_block(parent, chunk, salt, hash_fn)
        block_id = lookup(parent, chunk)
        if block_id is None:
            break
        found.append(block_id)
    return found
