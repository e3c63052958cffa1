"""Names in the store for the engine's entries: model identity, content hashes, the block index.

    entry key    key_prefix(fp, ns) + entry_hash(token ids)         64 hex, BLAKE2b-256
    block key    key_prefix(fp, ns) + block_hash(one block's ids)   32 hex, its own personalization
    block record index_record(entry hash, block index)              small JSON, a hint only

Hashes run over the token ids as int64 little-endian bytes, so every process and machine computes
the same names; ``window_hashes`` hashes every window of a prompt from one buffer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sparsex.segments import SegmentSpan

PINS_NAMESPACE = "\x00sparsex-pins"
"""The namespace of the pins manifest key (no tenant namespace starts with a NUL)."""
INDEX_VERSION = 1
_ENTRY_HASH = re.compile(r"[0-9a-f]{64}")


def weights_identity(model_path: Path) -> str:
    """The model folder's name (a converted GGUF's embeds its file size) plus its weight files' sizes."""
    files = sorted(p for p in model_path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    return model_path.name + "|" + ",".join(f"{p.name}:{p.stat().st_size}" for p in files)


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    return np.asarray(token_ids, dtype="<i8").tobytes()


def entry_hash(token_ids: Sequence[int]) -> str:
    """Content hash of an entry: 64 hex of BLAKE2b-256 over its token ids (int64 little-endian)."""
    return hashlib.blake2b(_token_bytes(token_ids), digest_size=32, person=b"sparsex-entry").hexdigest()


def block_hash(token_ids: Sequence[int]) -> str:
    """Hash of one block's token ids for the block index: 32 hex (its own domain, never an entry's)."""
    return window_hashes(token_ids, len(token_ids))[0]


def window_hashes(token_ids: Sequence[int], size: int) -> list[str]:
    """``block_hash`` of every window ``token_ids[p : p + size]`` (one buffer, ~1 us a window)."""
    data = _token_bytes(token_ids)
    return [hashlib.blake2b(data[8 * p : 8 * (p + size)], digest_size=16, person=b"sparsex-block").hexdigest()
            for p in range(len(token_ids) - size + 1)]


def index_record(content_hash: str, block: int) -> bytes:
    """The block-index value: which entry holds this block, and where."""
    return json.dumps({"v": INDEX_VERSION, "entry": content_hash, "block": block}).encode()


def parse_index_record(value: bytes) -> str | None:
    """The entry content hash a block-index record points at, or None if it is not one."""
    try:
        data = json.loads(value)
        content = data["entry"]
        if data.get("v") != INDEX_VERSION or not isinstance(content, str) or not _ENTRY_HASH.fullmatch(content):
            return None
        return content
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def namespace_regions(end: int, spans: Sequence[SegmentSpan], ns: str) -> list[tuple[int, int, str]]:
    """``[0, end)`` cut into regions searched in one namespace each: a span salted with another
    namespace in its own, everything else in the request's ``ns``."""
    foreign = sorted((s.start, min(s.end, end), s.namespace) for s in spans
                     if s.namespace and s.namespace != ns and s.start < end)
    out: list[tuple[int, int, str]] = []
    cursor = 0
    for a, b, other in foreign:
        if a > cursor:
            out.append((cursor, a, ns))
        if b > max(a, cursor):
            out.append((max(a, cursor), b, other))
        cursor = max(cursor, b)
    if cursor < end:
        out.append((cursor, end, ns))
    return out
