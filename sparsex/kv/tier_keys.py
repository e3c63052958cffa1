"""Names in the store for the engine's entries: model identity, content hashes, the block index.

    entry key    key_prefix(fp, ns) + entry_hash(token ids, ns)         64 hex, keyed BLAKE2b-256
    block key    key_prefix(fp, ns) + block_hash(one block's ids, ns)   32 hex, its own personalization
    block record index_record(entry hash, block index)                  small JSON, a hint only

Hashes run over the token ids as int64 little-endian bytes, so every process and machine computes
the same names; ``window_hashes`` hashes every window of a prompt from one buffer.

**Keyed by the namespace.** Content hashes are BLAKE2b in keyed mode, with a key derived from the
namespace (``namespace_key``): the same document under two tenants (two namespaces) gets unrelated
names, so key listings, logs and dashboards cannot tell that two tenants hold the same text, and a
guess can only be confirmed by someone who also knows the namespace. Values still carry the token
ids in clear (``sparsex/kvstore/codec.py``): whoever can read the values reads the documents.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PINS_NAMESPACE = "\x00sparsex-pins"
"""The namespace of the pins manifest key (no tenant namespace starts with a NUL)."""
INDEX_VERSION = 2
"""Version of block-index records and of the pins manifest (2: namespace-keyed content hashes;
version 1 records and manifests are ignored, so their entries are never found again)."""
_ENTRY_HASH = re.compile(r"[0-9a-f]{64}")


def weights_identity(model_path: Path) -> str:
    """The model folder's name (a converted GGUF's embeds its file size) plus its weight files' sizes."""
    files = sorted(p for p in model_path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    return model_path.name + "|" + ",".join(f"{p.name}:{p.stat().st_size}" for p in files)


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    return np.asarray(token_ids, dtype="<i8").tobytes()


def namespace_key(namespace: str) -> bytes:
    """The 32-byte BLAKE2b key of a namespace's content hashes (derived from the namespace alone, so
    every replica and a restarted engine compute the same names)."""
    return hashlib.blake2b(namespace.encode("utf-8", "surrogatepass"), digest_size=32,
                           person=b"sparsex-ns-key").digest()


def entry_hash(token_ids: Sequence[int], namespace: str) -> str:
    """Content hash of an entry: 64 hex of BLAKE2b-256 over its token ids (int64 little-endian),
    keyed by its namespace."""
    return hashlib.blake2b(_token_bytes(token_ids), digest_size=32, key=namespace_key(namespace),
                           person=b"sparsex-entry").hexdigest()


def block_hash(token_ids: Sequence[int], namespace: str) -> str:
    """Hash of one block's token ids for the block index: 32 hex, keyed by the namespace (its own
    domain, never an entry's)."""
    return window_hashes(token_ids, len(token_ids), namespace)[0]


def window_hashes(token_ids: Sequence[int], size: int, namespace: str) -> list[str]:
    """``block_hash`` of every window ``token_ids[p : p + size]`` (one buffer and one keyed state,
    copied per window: ~1 us a window)."""
    data = _token_bytes(token_ids)
    keyed = hashlib.blake2b(digest_size=16, key=namespace_key(namespace), person=b"sparsex-block")
    out = []
    for p in range(len(token_ids) - size + 1):
        h = keyed.copy()
        h.update(data[8 * p : 8 * (p + size)])
        out.append(h.hexdigest())
    return out


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
