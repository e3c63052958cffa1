"""Admission: decide a request's cache hits and reserve its blocks in one step (pure Python).

    waiting request ──admit──▶ find hits (exact prefix blocks, segment hits after it; refs taken)
                                 │  does prompt + max_tokens fit beside what running requests reserved?
                                 │    no, and segment hits hold free blocks -> hand hits back, last first
                                 │    no, still                             -> release all, stay waiting
                                 ▼
                               Admission(prefix_len, block_table, hits, spans)   (immutable)

The scheduler calls ``admit``; the prefill is then given the ``Admission`` and never goes back to
the cache to allocate. Like ``sparsex.cache``, this module sees token ids and block ids only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from sparsex.cache import BlockPool, NoFreeBlocksError, PrefixCache, SegmentIndex, chunk_tokens
from sparsex.request import Request
from sparsex.reuse.options import ReuseOptions
from sparsex.segments import SegmentSpan

MIN_AUTO_TEXT = 64
"""Unannotated text shorter than this (tokens) is not cut into automatic segments."""
MIN_AUTO_CHUNK = 16
"""Automatic chunks shorter than this (tokens) are not segments."""


@dataclass(frozen=True)
class SegmentReuse:
    """One segment's cached KV found for a request: prompt tokens ``[span.start, span.start + num_tokens)``.

    src_blocks: the cached blocks holding them (one reference each, owned by the admission).
    src_positions: each source block's original absolute position (for RoPE re-alignment).
    """

    span: SegmentSpan
    num_tokens: int
    src_blocks: tuple[int, ...]
    src_positions: tuple[int, ...]


@dataclass(frozen=True)
class Admission:
    """What an admitted request may reuse, and its blocks.

    prefix_len: exact prefix-cache hit length (tokens, a multiple of the block size).
    block_table: the request's blocks covering its prompt; the first ``prefix_len // block_size``
        are shared prefix blocks.
    hits: segment hits after the prefix, ascending and disjoint; their source blocks are released
        by whoever loads them (``SegmentStore.load``) or by ``KVCacheManager.release_hits``.
    spans: every segment of the prompt (explicit, chat, and automatic chunks).
    lookup_s: seconds the lookup and allocation took.
    """

    prefix_len: int
    block_table: tuple[int, ...]
    hits: tuple[SegmentReuse, ...]
    spans: tuple[SegmentSpan, ...]
    lookup_s: float = 0.0

    @property
    def num_segment_tokens(self) -> int:
        return sum(h.num_tokens for h in self.hits)


def auto_spans(n: int, ids: list[int], spans: list[SegmentSpan], namespace: str) -> list[SegmentSpan]:
    """Content-defined chunks of the text no explicit segment covers (boundaries from the tokens)."""
    covered = sorted((s.start, s.end) for s in spans)
    out: list[SegmentSpan] = []
    cursor = 0
    for a, b in [*covered, (n, n)]:
        if a - cursor >= MIN_AUTO_TEXT:
            for c0, c1 in chunk_tokens(ids[cursor:a]):
                if c1 - c0 >= MIN_AUTO_CHUNK:
                    out.append(SegmentSpan(cursor + c0, cursor + c1, "auto", namespace))
        cursor = max(cursor, b)
    return out


def own_namespace_len(n: int, spans: Sequence[SegmentSpan], namespace: str) -> int:
    """Tokens before the first segment salted with a namespace other than the request's.

    The prefix cache is salted with the request's namespace only, so it must never cover another
    namespace's segment text: that would let a tenant hit entries holding another tenant's text.
    """
    return min((s.start for s in spans if (s.namespace or namespace) != namespace), default=n)


class KVCacheManager:
    """Prefix cache + segment index over the block pool: lookup, admission, growth, release."""

    def __init__(self, pool: BlockPool, model_id: str) -> None:
        self.pool = pool
        self.prefix = PrefixCache(pool, model_id)
        self.segments = SegmentIndex(pool, model_id)

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.pool.block_size)

    def admit(self, req: Request, reserved_blocks: int) -> Admission | None:
        """Find ``req``'s hits and allocate its prompt blocks, or None (nothing held) if it cannot
        fit: prompt + ``max_tokens`` must fit in the free blocks less ``reserved_blocks`` (what
        running requests may still allocate)."""
        need = req.blocks_needed(self.block_size)
        if need > self.pool.num_free_blocks - reserved_blocks:
            return None
        t0 = time.perf_counter()
        opts: ReuseOptions = req.reuse
        spans = list(req.spans)
        n = len(req.prompt_token_ids)
        if opts.auto_segments:
            spans += auto_spans(n, req.prompt_token_ids, spans, opts.namespace)
        prefix_len, prefix_blocks, hits = self.lookup(
            req.prompt_token_ids, spans, opts.namespace, prefix=opts.uses_prefix, segments=opts.reuses_segments
        )
        # Hits on cached free blocks took them off the free list; hand hits back until it fits.
        while need - len(prefix_blocks) > self.pool.num_free_blocks - reserved_blocks and hits:
            self.pool.release(list(hits.pop().src_blocks))
        try:
            table = prefix_blocks + self.pool.allocate(self.blocks_for(n) - len(prefix_blocks))
        except NoFreeBlocksError:
            self.release_hits(hits)
            self.pool.release(prefix_blocks)
            return None
        return Admission(prefix_len, tuple(table), tuple(hits), tuple(spans), time.perf_counter() - t0)

    def lookup(
        self, ids: list[int], spans: list[SegmentSpan], ns: str, *, prefix: bool, segments: bool
    ) -> tuple[int, list[int], list[SegmentReuse]]:
        """Exact prefix (length, blocks), then segment hits after it; takes a reference on every block."""
        n, bs = len(ids), self.block_size
        prefix_blocks: list[int] = []
        if prefix:
            blocks = self.prefix.match(ids, ns)
            # The last token is always computed; other namespaces' segments are never covered.
            keep = min(len(blocks), (n - 1) // bs, own_namespace_len(n, spans, ns) // bs)
            self.pool.release(blocks[keep:])
            prefix_blocks = blocks[:keep]
        prefix_len = len(prefix_blocks) * bs
        hits: list[SegmentReuse] = []
        if not segments:
            return prefix_len, prefix_blocks, hits
        for span in sorted(spans, key=lambda s: s.start):
            if span.start < prefix_len:
                continue
            hit = self.segments.match(ids[span.start : span.end], span.namespace or ns)
            usable = min(hit.num_tokens, n - 1 - span.start)  # never reuse the last token
            keep_blocks = self.blocks_for(usable) if usable > 0 else 0
            self.pool.release(hit.block_ids[keep_blocks:])
            if usable > 0:
                hits.append(SegmentReuse(span, usable, tuple(hit.block_ids[:keep_blocks]),
                                         tuple(hit.positions[:keep_blocks])))
        return prefix_len, prefix_blocks, hits

    def allocate_prompt(self, req: Request) -> list[int]:
        """Blocks for ``req``'s prompt, no lookup (a follower: it copies its leader's prompt KV)."""
        return self.pool.allocate(self.blocks_for(len(req.prompt_token_ids)))

    def release_hits(self, hits: Sequence[SegmentReuse]) -> None:
        for h in hits:
            self.pool.release(list(h.src_blocks))

    def grow(self, block_table: list[int], num_tokens: int) -> list[int]:
        """New blocks so that ``block_table`` covers ``num_tokens`` (none if it already does)."""
        need = self.blocks_for(num_tokens) - len(block_table)
        return self.pool.allocate(need) if need > 0 else []
