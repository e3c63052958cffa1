"""One cached segment as bytes: a versioned header, token ids, positions, K, V and a checksum.

Layout (little-endian; ``L`` layers, ``T`` tokens, ``H`` KV heads, ``D`` head dim)::

    offset  field
    0       magic  b"SXKV"                          4 bytes
    4       version u16, storage dtype u8, flags u8
    8       L, T, H, D                               4 x u32
    24      len(fingerprint), len(namespace), len(content_hash)   3 x u32
    36      fingerprint, namespace, content_hash     UTF-8, unpadded
    ...     token ids                                T x i64
    ...     original positions                       T x i64
    ...     K                                        L*T*H*D x storage dtype, [L, T, H, D] C order
    ...     V                                        same
    end-32  checksum: BLAKE2b-256 of every byte before it

Decoding never returns data it could not verify: a wrong magic, version, length or checksum is a
``CorruptEntry``; a value that is intact but belongs to another model, namespace, content hash or
token sequence (a hash collision, a key reused after an upgrade) is an ``EntryMismatch``. Both are
``EntryRejected``, which the caller turns into a recompute.

torch is used only for dtype conversion (numpy has no bfloat16); K/V come back as CPU tensors in
the storage dtype and the caller casts them to the pool's dtype.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

StorageDtype = Literal["float32", "bfloat16", "float16"]
"""How K/V are stored: float32 round-trips bitwise; bfloat16/float16 halve the bytes."""

MAGIC = b"SXKV"
VERSION = 1
CHECKSUM_BYTES = 32

_HEADER = struct.Struct("<4sHBB4I3I")  # magic, version, dtype, flags, L, T, H, D, 3 string lengths
_DTYPE_CODES: dict[str, int] = {"float32": 1, "bfloat16": 2, "float16": 3}
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_CODE_TO_NAME = {code: name for name, code in _DTYPE_CODES.items()}

if sys.byteorder != "little":  # raw tensor bytes are written in host order
    raise ImportError("sparsex.kvstore.codec supports little-endian hosts only")


class EntryRejected(Exception):
    """A stored value that must not be served; the caller recomputes the segment."""


class CorruptEntry(EntryRejected):
    """The bytes are damaged: wrong magic or version, truncated, inconsistent lengths, bad checksum."""


class EntryMismatch(EntryRejected):
    """The bytes are intact but describe something else: another model, namespace, hash or tokens."""


@dataclass(frozen=True)
class KVEntry:
    """One segment's cached KV, as written by the engine and returned by ``decode_entry``."""

    fingerprint: str
    """Model fingerprint (weights identity, KV dtype, block size); see ``keys.model_fingerprint``."""
    namespace: str
    """Tenant namespace; entries of different namespaces never match."""
    content_hash: str
    """Hex digest naming the segment's content (the engine's segment hash)."""
    token_ids: list[int]
    """The segment's token ids; a load verifies them against the caller's tokens."""
    positions: list[int]
    """Original position of each token (the keys are rotated at these positions)."""
    keys: torch.Tensor
    """K of every layer: [L, T, H, D] (a numpy array is accepted too, and becomes a tensor)."""
    values: torch.Tensor
    """V of every layer: [L, T, H, D]."""

    def __post_init__(self) -> None:
        for name in ("keys", "values"):  # one type downstream; from_numpy shares memory (no copy)
            array = getattr(self, name)
            if isinstance(array, np.ndarray):
                object.__setattr__(self, name, torch.from_numpy(np.ascontiguousarray(array)))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class EntryExpectation:
    """What the caller believes a value holds; ``decode_entry`` rejects anything else."""

    fingerprint: str
    namespace: str
    content_hash: str
    token_ids: Sequence[int] | None
    """The tokens the caller expects; None when the caller does not know them yet (a lookup by a
    block of the entry): it must then check that ``content_hash`` is the hash of the returned ids."""


def _as_cpu_tensor(x: torch.Tensor, name: str) -> torch.Tensor:
    t = x.detach().cpu()
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape [layers, tokens, kv_heads, head_dim], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    return t


def _ints_to_bytes(values: Sequence[int], name: str) -> bytes:
    try:
        return np.asarray(values, dtype="<i8").tobytes()
    except OverflowError as err:
        raise ValueError(f"{name} out of int64 range") from err


def encode_entry(entry: KVEntry, storage: StorageDtype = "float32") -> bytes:
    """Serialize ``entry`` with K/V cast to ``storage``; see the module docstring for the layout."""
    if storage not in _DTYPE_CODES:
        raise ValueError(f"unknown storage dtype {storage!r}; expected one of {sorted(_DTYPE_CODES)}")
    keys = _as_cpu_tensor(entry.keys, "keys")
    values = _as_cpu_tensor(entry.values, "values")
    if keys.shape != values.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in shape")
    layers, tokens, heads, head_dim = keys.shape
    if len(entry.token_ids) != tokens or len(entry.positions) != tokens:
        raise ValueError(
            f"{len(entry.token_ids)} token ids and {len(entry.positions)} positions for {tokens} KV tokens"
        )
    strings = [s.encode("utf-8") for s in (entry.fingerprint, entry.namespace, entry.content_hash)]
    header = _HEADER.pack(
        MAGIC, VERSION, _DTYPE_CODES[storage], 0, layers, tokens, heads, head_dim, *map(len, strings)
    )
    dtype = _TORCH_DTYPES[storage]
    parts = [
        header,
        *strings,
        _ints_to_bytes(entry.token_ids, "token ids"),
        _ints_to_bytes(entry.positions, "positions"),
        # .view(uint8) reinterprets the storage dtype's bytes (numpy cannot hold bfloat16)
        keys.to(dtype).contiguous().view(torch.uint8).numpy().tobytes(),
        values.to(dtype).contiguous().view(torch.uint8).numpy().tobytes(),
    ]
    body = b"".join(parts)
    return body + hashlib.blake2b(body, digest_size=CHECKSUM_BYTES).digest()


def _tensor_from(data: memoryview, dtype: torch.dtype, shape: tuple[int, int, int, int]) -> torch.Tensor:
    if len(data) == 0:  # torch.frombuffer rejects empty buffers
        return torch.empty(shape, dtype=dtype)
    # bytearray: torch.frombuffer wants a writable buffer, and the tensor must not alias `data`
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def decode_entry(data: bytes, expect: EntryExpectation) -> KVEntry:
    """Parse and verify ``data``; return the entry only if it is intact and is what ``expect`` says.

    Raises ``CorruptEntry`` or ``EntryMismatch`` (both ``EntryRejected``); never returns partial data.
    """
    view = memoryview(data)
    if len(view) < _HEADER.size + CHECKSUM_BYTES:
        raise CorruptEntry(f"value of {len(view)} bytes is shorter than a header and checksum")
    magic, version, dtype_code, _flags, layers, tokens, heads, head_dim, *lengths = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CorruptEntry(f"bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise CorruptEntry(f"unsupported version {version} (this build reads {VERSION})")
    if dtype_code not in _CODE_TO_NAME:
        raise CorruptEntry(f"unknown storage dtype code {dtype_code}")
    dtype = _TORCH_DTYPES[_CODE_TO_NAME[dtype_code]]
    tensor_bytes = layers * tokens * heads * head_dim * dtype.itemsize
    expected_len = _HEADER.size + sum(lengths) + 2 * 8 * tokens + 2 * tensor_bytes + CHECKSUM_BYTES
    if len(view) != expected_len:
        raise CorruptEntry(f"value has {len(view)} bytes, its header describes {expected_len}")
    body, checksum = view[:-CHECKSUM_BYTES], view[-CHECKSUM_BYTES:]
    if hashlib.blake2b(body, digest_size=CHECKSUM_BYTES).digest() != checksum:
        raise CorruptEntry("checksum mismatch")

    offset = _HEADER.size
    strings = []
    for length in lengths:
        try:
            strings.append(bytes(view[offset : offset + length]).decode("utf-8"))
        except UnicodeDecodeError as err:  # a checksum is no signature: a crafted value gets here
            raise CorruptEntry(f"header string is not UTF-8: {err}") from err
        offset += length
    fingerprint, namespace, content_hash = strings
    for field, got, want in (
        ("fingerprint", fingerprint, expect.fingerprint),
        ("namespace", namespace, expect.namespace),
        ("content hash", content_hash, expect.content_hash),
    ):
        if got != want:
            raise EntryMismatch(f"{field} {got!r} != expected {want!r}")
    token_ids = np.frombuffer(view[offset : offset + 8 * tokens], dtype="<i8").tolist()
    offset += 8 * tokens
    if expect.token_ids is not None and token_ids != list(expect.token_ids):
        raise EntryMismatch(f"token ids differ from the expected {len(expect.token_ids or ())} tokens")
    positions = np.frombuffer(view[offset : offset + 8 * tokens], dtype="<i8").tolist()
    offset += 8 * tokens
    shape = (layers, tokens, heads, head_dim)
    keys = _tensor_from(view[offset : offset + tensor_bytes], dtype, shape)
    offset += tensor_bytes
    values = _tensor_from(view[offset : offset + tensor_bytes], dtype, shape)
    return KVEntry(fingerprint, namespace, content_hash, token_ids, positions, keys, values)
