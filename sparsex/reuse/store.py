"""Engine-side segment cache: finds reusable KV for a request, moves it in, publishes fresh KV.

    request tokens   [ prefix hit | new | segment A (hit) | new | segment B (hit) | question ]
    KV source        [ shared     | run | copied+aligned   | run | copied+aligned   | run      ]

Prefix blocks are shared read-only (exact). Segment KV is copied into the request's own
blocks and its keys rotated to the new positions. Only KV computed fresh is published.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsex.cache import BlockPool, NoFreeBlocksError, PrefixCache, SegmentIndex, chunk_tokens
from sparsex.kv_cache import KVCache
from sparsex.models.base import ModelSpec
from sparsex.models.rope import RopeTable, delta_rotation, rotate_into
from sparsex.segments import SegmentSpan


@dataclass
class SegmentReuse:
    """One segment's cached KV found for a request: tokens ``[start, start + num_tokens)``."""

    span: SegmentSpan
    num_tokens: int
    src_blocks: list[int]
    src_positions: list[int]


@dataclass
class Lookup:
    """What a request can reuse: an exact prefix and segment hits after it."""

    prefix_len: int = 0
    prefix_blocks: list[int] = field(default_factory=list)
    hits: list[SegmentReuse] = field(default_factory=list)

    @property
    def num_segment_tokens(self) -> int:
        return sum(h.num_tokens for h in self.hits)


def auto_spans(n: int, ids: list[int], spans: list[SegmentSpan], namespace: str) -> list[SegmentSpan]:
    """Content-defined chunks of the text no explicit segment covers (boundaries from the tokens)."""
    covered = sorted((s.start, s.end) for s in spans)
    out: list[SegmentSpan] = []
    cursor = 0
    for a, b in [*covered, (n, n)]:
        if a - cursor >= 64:
            for c0, c1 in chunk_tokens(ids[cursor:a]):
                if c1 - c0 >= 16:
                    out.append(SegmentSpan(cursor + c0, cursor + c1, "auto", namespace))
        cursor = max(cursor, b)
    return out


_DEFAULT_LOAD_CHUNK = 64  # tokens per rotate step through a float32 temporary (bf16 / fp16 KV)


def _contiguous_runs(src: torch.Tensor, dst: torch.Tensor) -> list[tuple[int, int]]:
    """Index ranges ``[i0, i1)`` over which both ``src`` and ``dst`` slots go up by one."""
    if src.numel() == 0:
        return []
    breaks = ((src[1:] - src[:-1] != 1) | (dst[1:] - dst[:-1] != 1)).nonzero().flatten() + 1
    edges = [0, *breaks.tolist(), src.numel()]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _layer_ranges(tables: list[RopeTable]) -> list[tuple[int, int, RopeTable]]:
    """Consecutive layers sharing a RoPE table: ``[(first, end, table)]`` (Llama: one range)."""
    out: list[tuple[int, int, RopeTable]] = []
    for layer, table in enumerate(tables):
        if out and out[-1][2] is table:
            out[-1] = (out[-1][0], layer + 1, table)
        else:
            out.append((layer, layer + 1, table))
    return out


def own_namespace_len(n: int, spans: list[SegmentSpan], namespace: str) -> int:
    """Tokens before the first segment salted with a namespace other than the request's.

    The prefix cache is salted with the request's namespace only, so it must never cover another
    namespace's segment text: that would let a tenant hit entries holding another tenant's text.
    """
    return min((s.start for s in spans if (s.namespace or namespace) != namespace), default=n)


class SegmentStore:
    """Prefix cache + segment index over the engine's block pool and KV tensors."""

    # Tokens per rotate step, all layers. float32 is rotated straight into the request's blocks (on
    # SmolLM2 512 and 1024 ran alike, both faster than 128);
    # lower precision goes through a float32 temporary, kept small so it is not page-faulted anew.
    _LOAD_CHUNK = {torch.float32: 512, torch.float64: 256}

    def __init__(self, pool: BlockPool, kv: KVCache, spec: ModelSpec, model_id: str) -> None:
        self.pool = pool
        self.kv = kv
        self.spec = spec
        self.prefix = PrefixCache(pool, model_id)
        self.segments = SegmentIndex(pool, model_id)

    def lookup(
        self, ids: list[int], spans: list[SegmentSpan], namespace: str, *, prefix: bool, segments: bool
    ) -> Lookup:
        """Find reusable KV; takes references on every returned block (released by the caller)."""
        n, bs = len(ids), self.pool.block_size
        out = Lookup()
        if prefix:
            blocks = self.prefix.match(ids, namespace)
            # The last token is always computed; other namespaces' segments are never covered.
            keep = min(len(blocks), (n - 1) // bs, own_namespace_len(n, spans, namespace) // bs)
            self.pool.release(blocks[keep:])
            out.prefix_blocks, out.prefix_len = blocks[:keep], keep * bs
        if not segments:
            return out
        for span in sorted(spans, key=lambda s: s.start):
            if span.start < out.prefix_len:
                continue
            hit = self.segments.match(ids[span.start : span.end], span.namespace or namespace)
            usable = min(hit.num_tokens, n - 1 - span.start)  # never reuse the last token
            keep_blocks = -(-usable // bs) if usable > 0 else 0
            self.pool.release(hit.block_ids[keep_blocks:])
            if usable > 0:
                out.hits.append(
                    SegmentReuse(span, usable, hit.block_ids[:keep_blocks], hit.positions[:keep_blocks])
                )
        return out

    def release(self, lookup: Lookup) -> None:
        for h in lookup.hits:
            self.pool.release(h.src_blocks)
        lookup.hits = []

    def load(self, lookup: Lookup, block_table: list[int]) -> torch.Tensor:
        """Copy every hit's KV into the request's blocks, keys rotated to the new positions.

        Releases the source blocks. Returns the [k] positions that were loaded.
        """
        if not lookup.hits:
            return torch.zeros(0, dtype=torch.int64)
        bs = self.pool.block_size
        src, frm, to = [], [], []
        for h in lookup.hits:
            j = torch.arange(h.num_tokens)
            blocks = torch.tensor(h.src_blocks)[j // bs]
            src.append(blocks * bs + j % bs)
            frm.append(torch.tensor(h.src_positions)[j // bs] + j % bs)
            to.append(h.span.start + j)
        src_slots, from_pos, to_pos = torch.cat(src), torch.cat(frm), torch.cat(to)
        dst_slots = self.kv.slots(block_table, to_pos)
        dev = self.kv.k.device
        rotations: dict[int, torch.Tensor] = {}  # per RoPE table (Gemma 3 has two)
        for table in self.spec.rope:
            if id(table) not in rotations:
                rot = delta_rotation(from_pos, to_pos, table).to(torch.complex64)
                # Expanded over KV heads: broadcasting over a middle dim makes the multiply ~1.5x slower.
                rotations[id(table)] = rot.expand(-1, self.spec.num_kv_heads, -1).contiguous().to(dev)
        k, v, ranges = self.kv.k, self.kv.v, _layer_ranges(self.spec.rope)
        chunk = self._LOAD_CHUNK.get(k.dtype, _DEFAULT_LOAD_CHUNK)
        # Runs of consecutive slots on both sides are moved with slices over every layer at once,
        # in chunks that stay in cache: one read and one write of each element (memory-bound).
        for i0, i1 in _contiguous_runs(src_slots, dst_slots):
            s0, d0 = int(src_slots[i0]) - i0, int(dst_slots[i0]) - i0
            v[:, d0 + i0 : d0 + i1] = v[:, s0 + i0 : s0 + i1]
            for a in range(i0, i1, chunk):
                b = min(a + chunk, i1)
                for l0, l1, table in ranges:
                    rot = rotations[id(table)][a:b]
                    rotate_into(k[l0:l1, d0 + a : d0 + b], k[l0:l1, s0 + a : s0 + b], rot)
        self.release(lookup)
        return to_pos

    def publish(
        self, ids: list[int], block_table: list[int], namespace: str, num_exact: int,
        fresh: list[SegmentSpan], pinned: bool = False, name: str | None = None,
    ) -> list[str]:
        """Publish exact prefix blocks and copy freshly computed segments into segment blocks.

        Prefix blocks stop at ``num_exact`` and at the first fresh segment of another namespace
        (a reused one already starts at or after ``num_exact``). Returns the ids of segments pinned
        (when ``pinned``). A full pool skips publishing.
        """
        num_exact = min(num_exact, own_namespace_len(len(ids), fresh, namespace))
        self.prefix.register(ids, block_table, namespace, num_exact)
        bs = self.pool.block_size
        pinned_ids: list[str] = []
        for span in fresh:
            toks = ids[span.start : span.end]
            ns = span.namespace or namespace
            missing = self.segments.missing_blocks(toks, ns)
            try:
                new = self.pool.allocate(len(missing)) if missing else []
            except NoFreeBlocksError:
                continue
            if missing:
                j = torch.cat([torch.arange(i * bs, min((i + 1) * bs, len(toks))) for i in missing])
                block_of = dict(zip(missing, new, strict=True))
                dst_blocks = torch.tensor([block_of[i] for i in (j // bs).tolist()])
                dst = dst_blocks * bs + j % bs
                src = self.kv.slots(block_table, span.start + j)
                self.kv.copy_slots(src.to(self.kv.k.device), dst.to(self.kv.k.device))
            sid = self.segments.register(
                toks, ns, span.start, dict(zip(missing, new, strict=True)), pinned=pinned, name=name
            )
            if sid is not None:
                pinned_ids.append(sid)
        return pinned_ids
