"""SegmentIndex: position-independent cache of segments (documents, messages, tool outputs).

A segment's blocks are aligned to the segment's own start, wherever it sits in a prompt, and its
hash chain restarts there (parent None), so the same tokens hit at any offset::

    B = 4; the segment S = s0..s9 appears at prompt offset 13 (first time) and 2 (later)

    prompt 1   | ... 13 tokens ... | s0 s1 s2 s3 s4 s5 s6 s7 s8 s9 | question ... |
    segment    |    block 11 (pos 13)  |  block 4 (pos 17)  | block 9 (pos 21) |
    blocks     | s0 s1 s2 s3           | s4 s5 s6 s7        | s8 s9 .  .       |  <- last block partial
    hashes     | g0 = H(None, s0..s3)  | g1 = H(g0, s4..s7) | g2 = H(g1, s8 s9)|

    prompt 2   | sys sys | s0 ... s9 | ...    -> same g0, g1, g2: a hit on blocks 11, 4, 9; the
                                                 engine rotates their keys by 2 - 13 = -11 positions.

Block positions are stored per block: a segment's blocks may have been computed in different
prompts (a partial hit completed later at another offset).

:meth:`SegmentIndex.match` finds a segment from its first token only. :meth:`SegmentIndex.find_runs`
finds any run of cached segment tokens at any offset of a plain prompt and of the entry (see
``run_matcher.py``); every block published here is indexed for it until the pool evicts it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sparsex.cache.block_pool import BlockPool
from sparsex.cache.hashing import (
    BlockHash,
    HashFn,
    default_hash_fn,
    hash_chain,
    serialize_block,
    walk_chain,
)
from sparsex.cache.listener import BlockListener, StoredBlocks
from sparsex.cache.run_matcher import RunMatcher
from sparsex.cache.token_runs import RunMatch

SEGMENT_DOMAIN = "segment"
"""Domain tag in every segment hash, so segment and prefix entries never hit each other."""


@dataclass
class SegmentHit:
    """The cached leading blocks of a segment (a partial hit when shorter than the segment)."""

    block_ids: list[int]
    """Hit blocks in segment order; block ``i`` holds segment tokens ``[i*B, (i+1)*B)``. One
    reference each is taken for the caller, who copies the KV out and then releases them."""
    positions: list[int]
    """Absolute position of each hit block's first token when its KV was computed."""
    num_tokens: int
    """Number of leading segment tokens covered by the hit."""


@dataclass(frozen=True)
class PinnedSegment:
    """A snapshot of one pinned ("frozen") segment."""

    segment_id: str
    """Stable id for listing and deletion (same tokens, namespace and model give the same id)."""
    name: str | None
    """Optional human-readable label given at pinning."""
    namespace: str
    """Tenant namespace the segment's hashes are salted with."""
    num_tokens: int
    """Length of the segment in tokens."""
    num_blocks: int
    """Number of KV blocks it holds pinned."""
    num_hits: int
    """Number of matches that hit at least one of its blocks."""
    last_used: int
    """Pool clock at its last hit (or at pinning, if never hit)."""
    block_ids: tuple[int, ...]
    """Its blocks, in segment order."""


@dataclass
class _PinnedRecord:
    """Mutable bookkeeping of a pinned segment; fields as in :class:`PinnedSegment`."""

    segment_id: str
    name: str | None
    namespace: str
    num_tokens: int
    block_ids: list[int]
    num_hits: int
    last_used: int

    def snapshot(self) -> PinnedSegment:
        return PinnedSegment(
            self.segment_id,
            self.name,
            self.namespace,
            self.num_tokens,
            len(self.block_ids),
            self.num_hits,
            self.last_used,
            tuple(self.block_ids),
        )


class SegmentIndex:
    """Publishes, matches and pins segment KV blocks in a shared :class:`BlockPool`.

    Invariants:
    - Every hash is salted with ``(model_id, namespace, "segment")``; namespaces never hit each other.
    - A hit is verified token by token; a match stops at the first miss or mismatch.
    - The index holds no references: unpinned segment blocks live in the pool's LRU list.
    - Every block of a pinned segment is pinned once per pinned segment containing it, so it stays
      cached until the segment is unpinned (by :meth:`unpin`, or by the pool's pressure hook,
      least-used first).
    - Every segment block this index published is in its :class:`RunMatcher` until the pool evicts
      it (the pool's evict hook), and no other block is.
    - ``listener`` (if any) is told of every segment block this index publishes and, since the
      pool's one evict hook is this index's, of every block the pool evicts (prefix blocks too).
    """

    def __init__(
        self, pool: BlockPool, model_id: str, hash_fn: HashFn = default_hash_fn, listener: BlockListener | None = None
    ) -> None:
        self._pool = pool
        self._model_id = model_id
        self._hash_fn = hash_fn
        self._listener = listener
        self._pinned: dict[str, _PinnedRecord] = {}
        # Pinned segment ids holding each pinned block (dicts as ordered sets).
        self._segments_of_block: dict[int, dict[str, None]] = {}
        self._runs = RunMatcher(pool.block_size)
        pool.set_pressure_hook(self._on_pressure)
        pool.set_evict_hook(self._on_evict)

    @property
    def pool(self) -> BlockPool:
        return self._pool

    @property
    def run_matcher(self) -> RunMatcher:
        """The any-offset index over this index's published blocks (read-only use)."""
        return self._runs

    # ----- matching ----------------------------------------------------------------------------

    def match(self, token_ids: Sequence[int], namespace: str) -> SegmentHit:
        """Longest run of the segment's leading blocks that is cached; increfs each hit block."""
        block_ids = walk_chain(token_ids, self._pool.block_size, self._salt(namespace), self._hash_fn,
                               self._pool.lookup, partial_last=True)
        hit = SegmentHit(block_ids=block_ids, positions=[], num_tokens=0)
        for block_id in block_ids:
            info = self._pool.info(block_id)
            if info.position is None:  # lookup only returns published blocks, which have a position
                raise RuntimeError(f"published block {block_id} has no position")
            hit.positions.append(info.position)
            hit.num_tokens += len(info.token_ids)
        self._pool.incref(hit.block_ids)
        self._credit_pinned(hit.block_ids)
        return hit

    def find_runs(self, token_ids: Sequence[int], namespace: str, min_run: int | None = None) -> RunMatch:
        """Every cached run of at least ``min_run`` tokens (default: one block) of a plain prompt.

        A run is prompt tokens equal to a contiguous run of one entry of ``namespace`` (any offset
        in the prompt, any offset in the entry); runs are disjoint, longest first on overlaps (tie
        rule in :func:`~sparsex.cache.token_runs.select_runs`). ``min_run`` may not be below
        ``run_matcher.min_findable_run``. Takes one reference per block of every run, released
        with :meth:`release_runs` once the KV is copied; hits credit pinned segments."""
        match = RunMatch(self._runs.find(token_ids, namespace, min_run))
        self._pool.incref(match.block_ids)
        self._credit_pinned(match.block_ids)
        return match

    def release_runs(self, match: RunMatch) -> None:
        """Give back the references :meth:`find_runs` took for ``match``."""
        self._pool.release(match.block_ids)

    def missing_blocks(self, token_ids: Sequence[int], namespace: str) -> list[int]:
        """Indices of the segment's blocks that are not cached (the ones the engine must store)."""
        hashes = hash_chain(token_ids, self._pool.block_size, self._salt(namespace), self._hash_fn)
        return [
            index
            for index, block_hash in enumerate(hashes)
            if self._pool.lookup(block_hash, self._block_tokens(token_ids, index)) is None
        ]

    # ----- publishing --------------------------------------------------------------------------

    def register(
        self,
        token_ids: Sequence[int],
        namespace: str,
        start_pos: int,
        block_ids: Mapping[int, int],
        pinned: bool = False,
        name: str | None = None,
    ) -> str | None:
        """Publish newly stored segment blocks (block index -> block id) and take over their refs.

        Block ``i`` must hold segment tokens ``[i*B, (i+1)*B)`` computed at absolute position
        ``start_pos + i*B``. The caller's reference on each given block is released here, so an
        unpinned segment's blocks join the LRU list; a block whose content was already cached
        elsewhere is a duplicate and simply becomes free. With ``pinned=True`` every block of the
        segment (given now or cached before) is pinned and the segment id is returned; all blocks
        must then be cached or given, else ValueError (and nothing changes)."""
        block_size = self._pool.block_size
        hashes = hash_chain(token_ids, block_size, self._salt(namespace), self._hash_fn)
        self._validate_register(token_ids, start_pos, block_ids, hashes, pinned)
        serving: dict[int, int] = {}
        published: list[tuple[int, int]] = []
        for index, block_id in sorted(block_ids.items()):
            tokens = self._block_tokens(token_ids, index)
            position = start_pos + index * block_size
            serving[index] = self._pool.register(block_id, hashes[index], tokens, position)
            info = self._pool.info(block_id)
            if info.block_hash == hashes[index]:  # published, not a duplicate or a collision
                parent = hashes[index - 1] if index else None
                self._runs.add_block(block_id, hashes[index], parent, info.token_ids, position, namespace)
                published.append((index, block_id))
        if published and self._listener is not None:
            end = (published[-1][0] + 1) * block_size
            self._listener.blocks_stored(StoredBlocks(SEGMENT_DOMAIN, namespace, tuple(token_ids[:end]), tuple(published)))
        segment_id: str | None = None
        if pinned:
            for index, block_hash in enumerate(hashes):
                if index not in serving:
                    cached = self._pool.lookup(block_hash, self._block_tokens(token_ids, index))
                    if cached is None:  # checked by _validate_register
                        raise RuntimeError(f"segment block {index} vanished while registering")
                    serving[index] = cached
            segment_id = self._pin(token_ids, namespace, [serving[i] for i in range(len(hashes))], name)
        self._pool.release([block_ids[index] for index in sorted(block_ids)])
        return segment_id

    # ----- pinned segments ---------------------------------------------------------------------

    def list_pinned(self, namespace: str | None = None) -> list[PinnedSegment]:
        """Pinned segments in pinning order, optionally of one namespace only."""
        return [
            record.snapshot()
            for record in self._pinned.values()
            if namespace is None or record.namespace == namespace
        ]

    def get_pinned(self, segment_id: str) -> PinnedSegment | None:
        record = self._pinned.get(segment_id)
        return None if record is None else record.snapshot()

    def unpin(self, segment_id: str) -> bool:
        """Unpin a segment (its blocks stay cached in the LRU list); False if it was not pinned."""
        record = self._pinned.pop(segment_id, None)
        if record is None:
            return False
        for block_id in record.block_ids:
            owners = self._segments_of_block[block_id]
            del owners[segment_id]
            if not owners:
                del self._segments_of_block[block_id]
        self._pool.unpin(record.block_ids)
        return True

    def segment_id(self, token_ids: Sequence[int], namespace: str) -> str:
        """The id a pinned segment of these tokens gets (always derived with BLAKE2b, not with the
        injected ``hash_fn``, so ids stay distinct even when tests force hash collisions)."""
        data = serialize_block(None, token_ids, (self._model_id, namespace, "segment-id"))
        return "seg-" + default_hash_fn(data)[:16].hex()

    # ----- internals ---------------------------------------------------------------------------

    def _on_evict(self, block_id: int) -> None:
        """Pool evict hook: the block leaves the any-offset index; the listener hears of it."""
        self._runs.drop_block(block_id)
        if self._listener is not None:
            self._listener.block_removed(block_id)

    def _on_pressure(self, num_blocks: int) -> None:
        """Pool pressure hook: unpin least-used segments (fewest hits, then least recently used)
        until ``num_blocks`` more blocks are free or nothing is pinned."""
        target = self._pool.num_free_blocks + num_blocks
        by_use = sorted(self._pinned.values(), key=lambda record: (record.num_hits, record.last_used))
        for record in by_use:
            if self._pool.num_free_blocks >= target:
                return
            self.unpin(record.segment_id)

    def _pin(self, token_ids: Sequence[int], namespace: str, block_ids: list[int], name: str | None) -> str:
        segment_id = self.segment_id(token_ids, namespace)
        record = self._pinned.get(segment_id)
        if record is not None:  # pinning the same segment again is a no-op (a new name is kept)
            record.name = name if name is not None else record.name
            return segment_id
        self._pool.pin(block_ids)
        self._pinned[segment_id] = _PinnedRecord(
            segment_id, name, namespace, len(token_ids), block_ids, num_hits=0, last_used=self._pool.clock
        )
        for block_id in block_ids:
            self._segments_of_block.setdefault(block_id, {})[segment_id] = None
        return segment_id

    def _credit_pinned(self, block_ids: list[int]) -> None:
        credited: dict[str, None] = {}
        for block_id in block_ids:
            credited.update(self._segments_of_block.get(block_id, {}))
        for segment_id in credited:
            record = self._pinned[segment_id]
            record.num_hits += 1
            record.last_used = self._pool.clock

    def _validate_register(
        self,
        token_ids: Sequence[int],
        start_pos: int,
        block_ids: Mapping[int, int],
        hashes: list[BlockHash],
        pinned: bool,
    ) -> None:
        """Check everything :meth:`register` needs before it changes any state."""
        if not token_ids:
            raise ValueError("cannot register an empty segment")
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        if len(set(block_ids.values())) != len(block_ids):
            raise ValueError("the same block id is given for two segment blocks")
        for index, block_id in block_ids.items():
            if not 0 <= index < len(hashes):
                raise ValueError(f"block index {index} outside the segment's {len(hashes)} blocks")
            info = self._pool.info(block_id)
            if info.ref_count == 0:
                raise ValueError(f"block {block_id} holds no reference; register allocated blocks only")
            tokens = tuple(self._block_tokens(token_ids, index))
            if info.block_hash is not None and (info.block_hash, info.token_ids) != (hashes[index], tokens):
                raise ValueError(f"block {block_id} is already published with other content")
        if pinned:
            missing = [
                index
                for index, block_hash in enumerate(hashes)
                if index not in block_ids
                and self._pool.lookup(block_hash, self._block_tokens(token_ids, index)) is None
            ]
            if missing:
                raise ValueError(
                    f"cannot pin a segment with uncached blocks {missing}: store them and pass them "
                    "in block_ids (see missing_blocks())"
                )

    def _block_tokens(self, token_ids: Sequence[int], index: int) -> Sequence[int]:
        block_size = self._pool.block_size
        return token_ids[index * block_size : (index + 1) * block_size]

    def _salt(self, namespace: str) -> tuple[str, ...]:
        return (self._model_id, namespace, SEGMENT_DOMAIN)
