"""Chained block hashes: unambiguous, chained, salted and identical across processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsex.cache import default_hash_fn, hash_block, hash_chain

SALT = ("model", "ns", "segment")
REPO_ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, hash_seed: str) -> str:
    """Run ``code`` in a fresh interpreter with its own ``hash()`` salt; return its stdout."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": python_path}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_hash_depends_on_parent_salt_and_tokens() -> None:
    root = hash_block(None, [1, 2], SALT)
    assert root == hash_block(None, (1, 2), SALT)
    assert len(root) == 32
    variants = {
        root,
        hash_block(root, [1, 2], SALT),
        hash_block(None, [2, 1], SALT),
        hash_block(None, [1, 2], ("model", "other", "segment")),
        hash_block(None, [1, 2], ("model", "ns", "prefix")),
        hash_block(None, [1, 2, 0], SALT),
    }
    assert len(variants) == 6


def test_serialization_is_unambiguous() -> None:
    assert hash_block(None, [1], ("ab", "c")) != hash_block(None, [1], ("a", "bc"))
    assert hash_block(None, [1], ("a",)) != hash_block(None, [1], ("a", ""))
    assert hash_block(None, [256], SALT) != hash_block(None, [1, 0], SALT)


def test_injected_hash_fn_is_used() -> None:
    assert hash_block(None, [1], SALT, hash_fn=lambda data: b"x") == b"x"


def test_hash_chain_restarts_at_none_and_ends_with_a_partial_block() -> None:
    hashes = hash_chain([1, 2, 3, 4, 5], block_size=2, salt=SALT)
    first = hash_block(None, [1, 2], SALT)
    second = hash_block(first, [3, 4], SALT)
    assert hashes == [first, second, hash_block(second, [5], SALT)]
    assert hash_chain([], 2, SALT) == []
    with pytest.raises(ValueError, match="block_size"):
        hash_chain([1], 0, SALT)


def test_out_of_range_token_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="out of range"):
        hash_block(None, [-1], SALT)
    with pytest.raises(ValueError, match="out of range"):
        hash_block(None, [2**63], SALT)


def test_hashes_are_identical_across_processes() -> None:
    code = "from sparsex.cache import hash_chain; print([h.hex() for h in hash_chain(list(range(9)), 4, ('m', 'n', 'd'))])"
    outputs = {run_python(code, hash_seed) for hash_seed in ("1", "2")}
    assert outputs == {str([h.hex() for h in hash_chain(list(range(9)), 4, ("m", "n", "d"))]) + "\n"}
    assert default_hash_fn(b"") == default_hash_fn(b"")
