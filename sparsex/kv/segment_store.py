"""Segment KV in the paged tensors: load admitted hits into a request, publish fresh KV.

    request tokens   [ prefix hit | new | segment A (hit) | new | segment B (hit) | question ]
    KV source        [ shared     | run | copied+aligned   | run | copied+aligned   | run      ]

Prefix blocks are shared read-only (exact). Segment KV is copied into the request's own
blocks and its keys rotated to the new positions. Only KV computed fresh is published. Which
blocks hold what is decided by ``sparsex.kv.admission`` (pure Python); this module moves tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sparsex.cache import NoFreeBlocksError
from sparsex.kv.admission import KVCacheManager, SegmentReuse, own_namespace_len
from sparsex.kv.paged import KVCache
from sparsex.models.base import ModelSpec
from sparsex.models.rope import RopeTable, delta_rotation, rotate_into
from sparsex.segments import SegmentSpan

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


@dataclass(frozen=True)
class PublishedSegment:
    """A segment ``SegmentStore.publish`` just stored from fresh KV.

    slots: the pool slots of its tokens in the publishing request's blocks ([T]); valid only during
        the ``on_publish`` call (the request's blocks are reused afterwards): copy what you keep.
    segment_id: its pinned id when it was pinned, else None.
    """

    token_ids: list[int]
    namespace: str
    start_pos: int
    slots: torch.Tensor
    segment_id: str | None
    name: str | None


class SegmentStore:
    """Prefix cache + segment index over the engine's block pool and KV tensors."""

    # Tokens per rotate step, all layers. float32 is rotated straight into the request's blocks (on
    # SmolLM2 512 and 1024 ran alike, both faster than 128);
    # lower precision goes through a float32 temporary, kept small so it is not page-faulted anew.
    _LOAD_CHUNK = {torch.float32: 512, torch.float64: 256}

    def __init__(self, manager: KVCacheManager, kv: KVCache, spec: ModelSpec) -> None:
        self.manager = manager
        self.pool = manager.pool
        self.kv = kv
        self.spec = spec
        self.on_publish: Callable[[PublishedSegment], None] | None = None
        """Told of every segment ``publish`` stored (the engine's tiered store, when configured)."""

    def load(self, hits: Sequence[SegmentReuse], block_table: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy every hit's KV into the request's blocks, keys rotated to the new positions.

        Releases the source blocks. Returns the [k] positions that were loaded and the [k]
        positions their KV was computed at.
        """
        if not hits:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        bs = self.pool.block_size
        src, frm, to = [], [], []
        for h in hits:
            k = h.first_offset + torch.arange(h.num_tokens)  # entry slots of the run's tokens
            blocks = torch.tensor(h.src_blocks)[k // bs]
            src.append(blocks * bs + k % bs)
            frm.append(torch.tensor(h.src_positions)[k // bs] + k % bs)
            to.append(h.span.start + torch.arange(h.num_tokens))
        src_slots, from_pos, to_pos = torch.cat(src), torch.cat(frm), torch.cat(to)
        dst_slots = self.kv.slots(list(block_table), to_pos)
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
        self.manager.release_hits(hits)
        return to_pos, from_pos

    def publish(
        self, ids: list[int], block_table: Sequence[int], namespace: str, num_exact: int,
        fresh: list[SegmentSpan], pinned: bool = False, name: str | None = None,
    ) -> list[str]:
        """Publish exact prefix blocks and copy freshly computed segments into segment blocks.

        Prefix blocks stop at ``num_exact`` and at the first fresh segment of another namespace
        (a reused one already starts at or after ``num_exact``). Returns the ids of segments pinned
        (when ``pinned``). A full pool skips publishing. Each segment published is then reported
        to ``on_publish`` (the tiered store writes it below the pool).
        """
        num_exact = min(num_exact, own_namespace_len(len(ids), fresh, namespace))
        self.manager.prefix.register(ids, list(block_table), namespace, num_exact)
        pinned_ids: list[str] = []
        for span in fresh:
            toks = ids[span.start : span.end]
            ns = span.namespace or namespace
            slots = self.kv.slots(list(block_table), span.start + torch.arange(len(toks)))

            def copy(j: torch.Tensor, dst: torch.Tensor, slots: torch.Tensor = slots) -> None:
                self.kv.copy_slots(slots[j].to(self.kv.k.device), dst.to(self.kv.k.device))

            published, sid = self._store_segment(toks, ns, span.start, copy, pinned, name)
            if sid is not None:
                pinned_ids.append(sid)
            if published and self.on_publish is not None:
                self.on_publish(PublishedSegment(toks, ns, span.start, slots, sid, name))
        return pinned_ids

    def publish_kv(
        self, token_ids: list[int], namespace: str, start_pos: int, keys: torch.Tensor, values: torch.Tensor,
        pinned: bool = False, name: str | None = None,
    ) -> tuple[bool, str | None]:
        """Publish a segment whose KV comes from elsewhere (a store tier), exactly like ``publish``
        does for fresh KV: the missing blocks get ``keys``/``values`` [L, T, H, D] (keys rotated at
        ``start_pos + i``, cast to the pool's dtype). Not reported to ``on_publish``.

        Returns (published, pinned segment id); (False, None) when the pool is full.
        """
        k_all, v_all = self.kv.k, self.kv.v

        def write(j: torch.Tensor, dst: torch.Tensor) -> None:
            for i0, i1 in _contiguous_runs(j, dst):  # slices: copy_ casts in place, no temporaries
                s0, d0 = int(j[i0]), int(dst[i0])
                k_all[:, d0 : d0 + i1 - i0].copy_(keys[:, s0 : s0 + i1 - i0])
                v_all[:, d0 : d0 + i1 - i0].copy_(values[:, s0 : s0 + i1 - i0])

        return self._store_segment(token_ids, namespace, start_pos, write, pinned, name)

    def _store_segment(
        self, toks: list[int], ns: str, start_pos: int, write: Callable[[torch.Tensor, torch.Tensor], None],
        pinned: bool, name: str | None,
    ) -> tuple[bool, str | None]:
        """Allocate the segment's uncached blocks, ``write(j, dst)`` (segment token indices j into
        pool slots dst), register them. (False, None) when the pool cannot hold them."""
        bs = self.pool.block_size
        missing = self.manager.segments.missing_blocks(toks, ns)
        try:
            new = self.pool.allocate(len(missing)) if missing else []
        except NoFreeBlocksError:
            return False, None
        if missing:
            j = torch.cat([torch.arange(i * bs, min((i + 1) * bs, len(toks))) for i in missing])
            block_of = dict(zip(missing, new, strict=True))
            dst_blocks = torch.tensor([block_of[i] for i in (j // bs).tolist()])
            try:
                write(j, dst_blocks * bs + j % bs)
            except Exception:
                self.pool.release(new)
                raise
        sid = self.manager.segments.register(
            toks, ns, start_pos, dict(zip(missing, new, strict=True)), pinned=pinned, name=name
        )
        return True, sid
