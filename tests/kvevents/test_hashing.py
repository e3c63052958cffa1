"""Our CBOR and block hashes against cbor2 (vLLM's CBOR library) and vLLM's formula."""

from __future__ import annotations

import random

import cbor2
import pytest

from sparsex.kvevents.hashing import BlockHasher, cbor, external, sha256_cbor
from tests.kvevents.subscriber import segment_hashes, to_int, vllm_prefix_hashes

VALUES = [None, True, False, 0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -1, -24, -25,
          -(2**63), b"", b"\x00" * 32, "", "sparsex:segment", "tenant/ñ", "x" * 300, (), (1, 2, 3), [1, [2, [3]]],
          (b"\xab" * 32, tuple(range(0, 150_000, 997)), None), (b"p", (7,), ("sparsex:segment", "alice/"))]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_cbor_is_cbor2_canonical(value: object) -> None:
    assert cbor(value) == cbor2.dumps(value, canonical=True)


def test_cbor_of_random_blocks_is_cbor2_canonical() -> None:
    rng = random.Random(0)
    for _ in range(500):
        block = tuple(rng.randrange(0, 2 ** rng.choice([4, 8, 16, 20, 31, 40])) for _ in range(16))
        parent = rng.randbytes(32)
        assert cbor((parent, block, None)) == cbor2.dumps((parent, block, None), canonical=True)


def test_cbor_refuses_what_block_hashes_never_hold() -> None:
    with pytest.raises(TypeError):
        cbor(1.5)
    with pytest.raises(ValueError):
        cbor(2**64)


def test_prefix_chain_is_vllms_sha256_cbor_chain() -> None:
    tokens = list(range(1000, 1000 + 16 * 5 + 3))
    hasher = BlockHasher("vllm-none-hash")
    assert hasher.none_hash == sha256_cbor("vllm-none-hash")
    assert [external(h) for h in hasher.prefix_chain(tokens, 16, "")] == vllm_prefix_hashes(tokens, 16)
    salted = [external(h) for h in hasher.prefix_chain(tokens, 16, "t/ns")]
    assert salted == vllm_prefix_hashes(tokens, 16, cache_salt="t/ns")
    assert salted[0] != vllm_prefix_hashes(tokens, 16)[0]
    assert [external(h) for h in BlockHasher("42").prefix_chain(tokens, 16, "")] == vllm_prefix_hashes(tokens, 16, "42")


def test_segment_blocks_hash_alone_and_never_like_a_prefix() -> None:
    tokens = list(range(64))
    hasher = BlockHasher("vllm-none-hash")
    mine = [external(hasher.segment_block(tokens[i : i + 16], "")) for i in range(0, 64, 16)]
    assert mine == segment_hashes(tokens, 16)
    assert mine[0] != vllm_prefix_hashes(tokens, 16)[0]  # the first block of a prompt that is the segment
    assert external(hasher.segment_block(tokens[16:32], "")) == mine[1]  # found wherever it sits


def test_the_default_seed_is_vllms(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsex.kvevents import KVEventsConfig

    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    assert KVEventsConfig().seed == "vllm-none-hash"
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    assert KVEventsConfig().seed == "0" and KVEventsConfig(hash_seed="7").seed == "7"


def test_external_hash_is_the_last_eight_bytes() -> None:
    digest = bytes(range(32))
    assert external(digest) == to_int(digest) == int.from_bytes(digest[24:], "big")
