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
from dataclasses import dataclass, replace
from typing import Protocol

from sparsex.cache import (
    BlockPool,
    NoFreeBlocksError,
    PrefixCache,
    SegmentIndex,
    blocks_for_tokens,
    chunk_tokens,
)
from sparsex.cache.listener import BlockListener
from sparsex.kv.policy import CachePolicy
from sparsex.segments import SegmentSpan

MIN_AUTO_TEXT = 64
"""Unannotated text shorter than this (tokens) is not cut into automatic segments."""
MIN_AUTO_CHUNK = 16
"""Automatic chunks shorter than this (tokens) are not segments."""


@dataclass(frozen=True)
class SegmentReuse:
    """One cached run found for a request: prompt tokens ``[span.start, span.start + num_tokens)``.

    span: where the run sits in the prompt; its source is that of the prompt segment holding the
        run's first token (``explicit``, ``chat``, ``pinned``), else ``auto`` (plain text).
    src_blocks: the entry's blocks holding the run (one reference each, owned by the admission).
    src_positions: each source block's original absolute position (for RoPE re-alignment).
    first_offset: slot of the run's first token in ``src_blocks[0]`` (runs start anywhere in an entry).

    Run token ``j`` is entry slot ``k = first_offset + j``: block ``src_blocks[k // B]``, slot
    ``k % B``, originally at position ``src_positions[k // B] + k % B``.
    """

    span: SegmentSpan
    num_tokens: int
    src_blocks: tuple[int, ...]
    src_positions: tuple[int, ...]
    first_offset: int = 0


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
    def runs(self) -> list[tuple[int, int]]:
        """``[start, end)`` prompt positions of every hit, ascending."""
        return [(h.span.start, h.span.start + h.num_tokens) for h in self.hits]

    @property
    def num_seam_lost_tokens(self) -> int:
        """Tokens of prompt segments that were found in part but not these ones (lost at seams:
        BPE merges across a boundary, edited text, runs shorter than the minimum)."""
        return seam_lost_tokens(self.spans, self.hits)


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


def seam_lost_tokens(spans: Sequence[SegmentSpan], hits: Sequence[SegmentReuse]) -> int:
    """Tokens of the spans that overlap a hit but are covered by none."""
    covered = sorted((h.span.start, h.span.start + h.num_tokens) for h in hits)
    lost = 0
    for s in spans:
        inside = [(max(a, s.start), min(b, s.end)) for a, b in covered if a < s.end and b > s.start]
        if inside:
            lost += (s.end - s.start) - sum(b - a for a, b in inside)
    return lost


def fresh_pieces(
    spans: Sequence[SegmentSpan], runs: Sequence[tuple[int, int]], min_len: int = MIN_AUTO_CHUNK
) -> list[SegmentSpan]:
    """The parts of ``spans`` that no reused run ``[a, b)`` covers, each at least ``min_len`` tokens.

    A segment found in part (an overlapping passage, a document after a seam) still holds tokens
    that were computed here; each such piece becomes an entry of its own, so that a later prompt
    finds it (shorter pieces could never be found: lookup needs a block's worth of tokens)."""
    out: list[SegmentSpan] = []
    for s in spans:
        cursor = s.start
        for a, b in sorted(runs):
            if b <= cursor or a >= s.end:
                continue
            if a - cursor >= min_len:
                out.append(replace(s, start=cursor, end=a))
            cursor = max(cursor, b)
        if s.end - cursor >= min_len:
            out.append(replace(s, start=cursor, end=s.end))
    return out


def namespace_regions(start: int, end: int, spans: Sequence[SegmentSpan], ns: str) -> list[tuple[int, int, str]]:
    """``[start, end)`` cut into maximal regions searched in one namespace each: a span salted with
    another namespace is searched in its own; everything else in the request's ``ns``."""
    foreign = sorted((max(s.start, start), min(s.end, end), s.namespace) for s in spans
                     if s.namespace and s.namespace != ns and s.start < end and s.end > start)
    out: list[tuple[int, int, str]] = []
    cursor = start
    for a, b, other in foreign:
        if a > cursor:
            out.append((cursor, a, ns))
        if b > max(a, cursor):
            out.append((max(a, cursor), b, other))
        cursor = max(cursor, b)
    if cursor < end:
        out.append((cursor, end, ns))
    return out


def source_at(spans: Sequence[SegmentSpan], position: int) -> str:
    """The source of the prompt segment holding ``position`` (annotated ones first), else ``auto``."""
    for s in spans:
        if s.start <= position < s.end and s.source != "auto":
            return str(s.source)
    return "auto"


class AdmissionRequest(Protocol):
    """What admission reads of a request (``sparsex.core.request.Request`` is one)."""

    @property
    def prompt_token_ids(self) -> list[int]: ...

    @property
    def spans(self) -> list[SegmentSpan]: ...

    @property
    def cache(self) -> CachePolicy: ...

    @property
    def uses_prefix(self) -> bool: ...

    @property
    def reuses_segments(self) -> bool: ...

    def blocks_needed(self, block_size: int) -> int: ...


class KVCacheManager:
    """Prefix cache + segment index over the block pool: lookup, admission, growth, release.

    min_run: shortest cached token run reused anywhere in a prompt (None: one block).
    listener: told of every block published and evicted (the KV event publisher), or None.
    """

    def __init__(
        self, pool: BlockPool, model_id: str, min_run: int | None = None, listener: BlockListener | None = None
    ) -> None:
        self.pool = pool
        self.prefix = PrefixCache(pool, model_id, listener=listener)
        self.segments = SegmentIndex(pool, model_id, listener=listener)
        self.min_run = min_run if min_run is not None else pool.block_size

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for_tokens(num_tokens, self.pool.block_size)

    def admit(self, req: AdmissionRequest, reserved_blocks: int) -> Admission | None:
        """Find ``req``'s hits and allocate its prompt blocks, or None (nothing held) if it cannot
        fit: prompt + ``max_tokens`` must fit in the free blocks less ``reserved_blocks`` (what
        running requests may still allocate)."""
        need = req.blocks_needed(self.block_size)
        if need > self.pool.num_free_blocks - reserved_blocks:
            return None
        t0 = time.perf_counter()
        cache = req.cache
        spans = list(req.spans)
        n = len(req.prompt_token_ids)
        if cache.auto_segments:
            spans += auto_spans(n, req.prompt_token_ids, spans, cache.namespace)
        prefix_len, prefix_blocks, hits = self.lookup(
            req.prompt_token_ids, spans, cache.namespace, prefix=req.uses_prefix, segments=req.reuses_segments,
            plain_text=cache.auto_segments,
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
        self, ids: list[int], spans: list[SegmentSpan], ns: str, *, prefix: bool, segments: bool,
        plain_text: bool = True,
    ) -> tuple[int, list[int], list[SegmentReuse]]:
        """Exact prefix (length, blocks), then cached runs after it; takes a reference on every block.

        ``plain_text=False`` searches only inside the prompt's segments (explicit, chat), not in
        unannotated text."""
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
        # Any cached run of at least min_run tokens, at any offset of the prompt and of an entry,
        # whatever the segments were cut at; never the last token (its logits are needed).
        regions = namespace_regions(prefix_len, n - 1, spans, ns)
        if not plain_text:
            regions = [(max(a, s.start), min(b, s.end), r_ns) for a, b, r_ns in regions for s in spans
                       if s.source != "auto" and max(a, s.start) < min(b, s.end)]
        for a, b, region_ns in regions:
            if b - a < self.min_run:
                continue
            for run in self.segments.find_runs(ids[a:b], region_ns, self.min_run).runs:
                start = a + run.prompt_start
                span = SegmentSpan(start, start + run.num_tokens, source_at(spans, start), region_ns)  # type: ignore[arg-type]
                hits.append(SegmentReuse(span, run.num_tokens, run.block_ids, run.positions, run.first_offset))
        return prefix_len, prefix_blocks, hits

    def allocate_prompt(self, req: AdmissionRequest) -> list[int]:
        """Blocks for ``req``'s prompt, no lookup (a follower: it copies its leader's prompt KV)."""
        return self.pool.allocate(self.blocks_for(len(req.prompt_token_ids)))

    def release_hits(self, hits: Sequence[SegmentReuse]) -> None:
        for h in hits:
            self.pool.release(list(h.src_blocks))

    def grow(self, block_table: list[int], num_tokens: int) -> list[int]:
        """New blocks so that ``block_table`` covers ``num_tokens`` (none if it already does)."""
        need = self.blocks_for(num_tokens) - len(block_table)
        return self.pool.allocate(need) if need > 0 else []
