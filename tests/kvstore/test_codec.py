"""Entry codec: exact fp32 round trip, bf16/fp16 within tolerance, and every kind of bad value rejected."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

from sparsex.kvstore import (
    CorruptEntry,
    EntryExpectation,
    EntryMismatch,
    KVEntry,
    decode_entry,
    encode_entry,
    entry_key,
    model_fingerprint,
)
from sparsex.kvstore.codec import CHECKSUM_BYTES

FP = model_fingerprint("smollm2-135m@abc123", "float32", 16)
SHAPE = (3, 5, 2, 4)  # [layers, tokens, kv_heads, head_dim]


def make_entry(namespace: str = "tenant-a", seed: int = 0, numpy_kv: bool = False) -> KVEntry:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(SHAPE, generator=g)
    values = torch.randn(SHAPE, generator=g)
    return KVEntry(
        fingerprint=FP,
        namespace=namespace,
        content_hash="ab" * 16,
        token_ids=[101, 7, 2**40, 0, 42],
        positions=[10, 11, 12, 13, 14],
        keys=keys.numpy() if numpy_kv else keys,  # type: ignore[arg-type]
        values=values.numpy() if numpy_kv else values,  # type: ignore[arg-type]
    )


def expect_of(entry: KVEntry) -> EntryExpectation:
    return EntryExpectation(entry.fingerprint, entry.namespace, entry.content_hash, entry.token_ids)


@pytest.mark.parametrize("numpy_kv", [False, True])
def test_fp32_round_trip_is_bitwise(numpy_kv: bool) -> None:
    entry = make_entry(numpy_kv=numpy_kv)
    assert isinstance(entry.keys, torch.Tensor)  # numpy input is converted
    entry.keys[0, 0, 0, 0] = float("nan")  # odd values survive too
    entry.values[1, 2, 1, 3] = -0.0
    got = decode_entry(encode_entry(entry, "float32"), expect_of(entry))
    assert (got.fingerprint, got.namespace, got.content_hash) == (FP, "tenant-a", "ab" * 16)
    assert got.token_ids == entry.token_ids and got.positions == entry.positions
    assert got.keys.dtype == torch.float32 and tuple(got.keys.shape) == SHAPE
    for stored, original in ((got.keys, entry.keys), (got.values, entry.values)):
        assert torch.equal(stored.view(torch.int32), original.view(torch.int32))  # bit patterns


@pytest.mark.parametrize(("storage", "dtype", "tol"), [("bfloat16", torch.bfloat16, 1e-2),
                                                       ("float16", torch.float16, 1e-3)])
def test_half_storage_round_trip_within_tolerance(storage: str, dtype: torch.dtype, tol: float) -> None:
    entry = make_entry()
    data = encode_entry(entry, storage)  # type: ignore[arg-type]
    assert len(data) < len(encode_entry(entry, "float32"))
    got = decode_entry(data, expect_of(entry))
    assert got.keys.dtype == dtype
    torch.testing.assert_close(got.keys.float(), entry.keys, rtol=tol, atol=tol)
    torch.testing.assert_close(got.values.float(), entry.values, rtol=tol, atol=tol)
    # exactly what a cast gives: storage is the only loss
    assert torch.equal(got.values, entry.values.to(dtype))


def test_encode_rejects_inconsistent_entries() -> None:
    entry = make_entry()
    with pytest.raises(ValueError, match="token ids"):
        encode_entry(KVEntry(FP, "", "ab", [1, 2], [0, 1], entry.keys, entry.values))
    with pytest.raises(ValueError, match="differ in shape"):
        encode_entry(KVEntry(FP, "", "ab", entry.token_ids, entry.positions, entry.keys, entry.values[:2]))
    with pytest.raises(ValueError, match="unknown storage"):
        encode_entry(entry, "int8")  # type: ignore[arg-type]


def test_truncated_value_is_corrupt() -> None:
    entry = make_entry()
    data = encode_entry(entry)
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(CorruptEntry):
            decode_entry(data[:cut], expect_of(entry))
    with pytest.raises(CorruptEntry):
        decode_entry(data + b"\x00", expect_of(entry))


def test_flipped_byte_anywhere_is_corrupt() -> None:
    entry = make_entry()
    data = encode_entry(entry)
    header_end = 36 + len(FP)
    for offset in (0, 5, 12, header_end, len(data) // 2, len(data) - CHECKSUM_BYTES - 1, len(data) - 1):
        bad = bytearray(data)
        bad[offset] ^= 0x01
        with pytest.raises(CorruptEntry):
            decode_entry(bytes(bad), expect_of(entry))


def test_lying_header_is_corrupt_not_a_crash() -> None:
    entry = make_entry()
    data = bytearray(encode_entry(entry))
    struct.pack_into("<I", data, 12, 2**31)  # absurd token count
    with pytest.raises(CorruptEntry, match="describes"):
        decode_entry(bytes(data), expect_of(entry))
    data = bytearray(encode_entry(entry))
    struct.pack_into("<H", data, 4, 99)  # a future version
    with pytest.raises(CorruptEntry, match="version"):
        decode_entry(bytes(data), expect_of(entry))


def test_bad_utf8_with_a_valid_checksum_is_corrupt() -> None:
    data = bytearray(encode_entry(make_entry()))
    data[36] = 0xFF  # first byte of the fingerprint
    body = bytes(data[:-CHECKSUM_BYTES])
    forged = body + hashlib.blake2b(body, digest_size=CHECKSUM_BYTES).digest()
    with pytest.raises(CorruptEntry, match="UTF-8"):
        decode_entry(forged, expect_of(make_entry()))


@pytest.mark.parametrize("field", ["fingerprint", "namespace", "content_hash", "token_ids"])
def test_intact_value_of_something_else_is_a_mismatch(field: str) -> None:
    entry = make_entry()
    data = encode_entry(entry)
    wrong: dict[str, Any] = {
        "fingerprint": model_fingerprint("smollm2-135m@abc123", "bfloat16", 16),
        "namespace": "tenant-b",
        "content_hash": "cd" * 16,
        "token_ids": [101, 7, 2**40, 0, 43],
    }
    expect = dataclasses.replace(expect_of(entry), **{field: wrong[field]})
    with pytest.raises(EntryMismatch):
        decode_entry(data, expect)


def test_fewer_expected_tokens_is_a_mismatch() -> None:
    entry = make_entry()
    with pytest.raises(EntryMismatch):
        decode_entry(encode_entry(entry), EntryExpectation(FP, "tenant-a", "ab" * 16, entry.token_ids[:-1]))


def test_entry_key_layout() -> None:
    key = entry_key(FP, "tenant-a", "ab" * 16)
    prefix, tag, content = key.split(":")
    assert prefix == "sparsex" and content == "ab" * 16
    assert tag.startswith("{") and tag.endswith("}") and len(tag) == 2 + 16 + 1 + 16
    # same model + namespace share the hash tag (one cluster slot); another namespace does not
    assert entry_key(FP, "tenant-a", "cd").split(":")[1] == tag
    assert entry_key(FP, "tenant-b", "ab" * 16) != key
    assert "tenant" not in key  # tenant names never appear in the store
    with pytest.raises(ValueError):
        entry_key(FP, "tenant-a", "not hex")


def test_package_imports_no_engine_layers() -> None:
    code = (
        "import sys, sparsex.kvstore\n"
        "bad = [m for m in sys.modules if m.startswith(('sparsex.core.engine', 'sparsex.reuse', "
        "'sparsex.server', 'sparsex.runtime.model_runner'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_empty_namespace_and_numpy_float16_input() -> None:
    keys = np.ones(SHAPE, dtype=np.float16)
    entry = KVEntry(FP, "", "00", list(range(5)), list(range(5)), keys, keys * 2)  # type: ignore[arg-type]
    got = decode_entry(encode_entry(entry, "float16"), EntryExpectation(FP, "", "00", list(range(5))))
    assert torch.equal(got.values, torch.full(SHAPE, 2.0, dtype=torch.float16))
