"""``EventBuilder``: cache and store news -> vLLM KV events (no sockets, no threads).

What a subscriber learns, per medium (``wire.py``)::

    pool (GPU)    prefix blocks published  -> BlockStored(chain hashes, parent, tokens)  one per run
                  segment blocks published -> BlockStored(segment hashes, parent None, tokens,
                                                          extra_keys [("sparsex:segment",), ...])
                  a block evicted          -> BlockRemoved([its hash])
    DISK, REDIS   an entry written         -> BlockStored(segment hashes of its full blocks)
                  an entry deleted/evicted -> BlockRemoved(the same hashes)
    start, close                           -> AllBlocksCleared

Invariants:
- Only full blocks are announced (vLLM's rule); a segment's partial last block is not.
- Per medium, a hash is announced stored when its first holder appears and removed when its last
  one goes (the same 16 tokens cached in two segments are one hash with two holders).
- Token ids go out only for the shared namespace ``""`` unless ``publish_token_ids``; namespaces
  never go out (they only salt the hashes, see ``hashing.py``).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sparsex.cache.listener import StoredBlocks
from sparsex.kvevents.hashing import SEGMENT_KEY, BlockHasher, external
from sparsex.kvevents.wire import (
    MEDIUM_POOL,
    TIER_MEDIUM,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
)

PREFIX = "prefix"


@dataclass
class _Entry:
    """A store entry this replica wrote or promoted: its full blocks' hashes and (visible) tokens."""

    hashes: list[int]
    token_ids: list[int]
    media: set[str] = field(default_factory=set)
    """Media it was announced stored in."""


class EventBuilder:
    """Keeps what subscribers were told, and turns each change into the events that tell it."""

    def __init__(self, block_size: int, hasher: BlockHasher, publish_token_ids: bool = False,
                 max_entries: int = 4096) -> None:
        self.block_size = block_size
        self.hasher = hasher
        self.publish_token_ids = publish_token_ids
        self.max_entries = max_entries
        self._pool: dict[int, int] = {}  # pool block id -> the hash announced for it
        self._holders: Counter[tuple[str, int]] = Counter()  # (medium, hash) -> holders
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # store key -> entry

    # ----- the pool --------------------------------------------------------------------------------

    def stored(self, s: StoredBlocks) -> list[KVCacheEvent]:
        bs, out = self.block_size, []
        tokens = s.token_ids
        full = [(i, b) for i, b in s.blocks if (i + 1) * bs <= len(tokens)]
        for _, block_id in full:  # a reused id whose removal was lost (a full queue): forget it first
            out += self.removed(block_id)
        if s.domain == PREFIX:  # one block per hash: a prefix hash is its whole chain's
            chain = [external(h) for h in self.hasher.prefix_chain(tokens, bs, s.namespace)]
            held = {i: chain[i] for i, _ in full}
            for run in _runs(list(held)):
                self._hold(MEDIUM_POOL, [chain[i] for i in run])
                parent = chain[run[0] - 1] if run[0] > 0 else None
                out.append(self._stored([chain[i] for i in run], parent, tokens[run[0] * bs : (run[-1] + 1) * bs],
                                        s.namespace))
        else:
            held = {i: external(self.hasher.segment_block(tokens[i * bs : (i + 1) * bs], s.namespace))
                    for i, _ in full}
            first = {h: i for i, h in reversed(held.items())}  # a repeated block: its first copy
            new = self._hold(MEDIUM_POOL, list(held.values()))
            if new:
                toks = [t for h in new for t in tokens[first[h] * bs : (first[h] + 1) * bs]]
                out.append(self._stored(new, None, toks, s.namespace, segment=True))
        self._pool.update({block_id: held[i] for i, block_id in full})
        return out

    def removed(self, block_id: int) -> list[KVCacheEvent]:
        h = self._pool.pop(block_id, None)
        if h is None:
            return []
        gone = self._release(MEDIUM_POOL, [h])
        return [BlockRemoved(gone, MEDIUM_POOL)] if gone else []

    # ----- the store tiers ---------------------------------------------------------------------------

    def entry(self, key: str, namespace: str, token_ids: Sequence[int]) -> list[KVCacheEvent]:
        """A store entry this replica writes or promotes (told before any tier reports it stored)."""
        bs, out = self.block_size, []
        if key not in self._entries:
            n = len(token_ids) // bs
            hashes = [external(self.hasher.segment_block(token_ids[i * bs : (i + 1) * bs], namespace))
                      for i in range(n)]
            visible = self.publish_token_ids or namespace == ""
            self._entries[key] = _Entry(hashes, list(token_ids[: n * bs]) if visible else [])
            while len(self._entries) > self.max_entries:  # forgotten: subscribers forget it too
                old_key, old = self._entries.popitem(last=False)
                for medium in sorted(old.media):
                    out += self._entry_gone(old, medium)
        self._entries.move_to_end(key)
        return out

    def entry_stored(self, key: str, tier: str) -> list[KVCacheEvent]:
        e = self._entries.get(key)
        if e is None:  # not an entry (a block-index record, the pins manifest) or a forgotten one
            return []
        medium = TIER_MEDIUM.get(tier, tier.upper())
        if medium in e.media or not e.hashes:
            return []
        e.media.add(medium)
        hashes = self._hold(medium, e.hashes)
        if not hashes:
            return []
        toks = [t for h in hashes for t in e.token_ids[e.hashes.index(h) * self.block_size :][: self.block_size]]
        return [BlockStored(hashes, None, toks, self.block_size, None, medium, None, [(SEGMENT_KEY,)] * len(hashes))]

    def entry_removed(self, key: str, tier: str) -> list[KVCacheEvent]:
        e = self._entries.get(key)
        medium = TIER_MEDIUM.get(tier, tier.upper())
        return self._entry_gone(e, medium) if e is not None and medium in e.media else []

    # ----- everything --------------------------------------------------------------------------------

    def cleared(self) -> list[KVCacheEvent]:
        """Forget everything announced (start, shutdown)."""
        self._pool.clear()
        self._holders.clear()
        self._entries.clear()
        return [AllBlocksCleared()]

    # ----- internals ---------------------------------------------------------------------------------

    def _stored(self, hashes: list[int], parent: int | None, tokens: Sequence[int], namespace: str,
                segment: bool = False) -> BlockStored:
        visible = self.publish_token_ids or namespace == ""
        extra: list[tuple[Any, ...] | None] | None = [(SEGMENT_KEY,)] * len(hashes) if segment else None
        return BlockStored(hashes, parent, list(tokens) if visible else [], self.block_size, None, MEDIUM_POOL,
                           None, extra)

    def _entry_gone(self, e: _Entry, medium: str) -> list[KVCacheEvent]:
        e.media.discard(medium)
        gone = self._release(medium, e.hashes)
        return [BlockRemoved(gone, medium)] if gone else []

    def _hold(self, medium: str, hashes: list[int]) -> list[int]:
        """Count one more holder of each hash; return those that had none (to announce)."""
        new = []
        for h in hashes:
            if self._holders[(medium, h)] == 0 and h not in new:
                new.append(h)
            self._holders[(medium, h)] += 1
        return new

    def _release(self, medium: str, hashes: list[int]) -> list[int]:
        """Count one holder fewer of each hash; return those left with none (to announce)."""
        gone = []
        for h in hashes:
            key = (medium, h)
            if self._holders[key] <= 0:  # never announced here
                continue
            self._holders[key] -= 1
            if self._holders[key] <= 0:
                del self._holders[key]
                if h not in gone:
                    gone.append(h)
        return gone


def _runs(indices: list[int]) -> list[list[int]]:
    """Ascending indices cut into runs of consecutive ones."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][-1] == i - 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out
