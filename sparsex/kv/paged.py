"""Paged KV storage: per layer, one flat tensor of ``num_blocks * block_size`` slots.

    slot = block_id * block_size + offset_in_block

      block 0        block 1        block 7
    [s0 .. s15]    [s16 .. s31]   [s112 .. s127]     one layer's K (and V) storage

A request's block table lists its blocks in position order; position p lives in slot
``table[p // bs] * bs + p % bs``. Block ids are managed by ``sparsex.cache.BlockPool``;
this module only stores and moves tensors (it implements ``sparsex.models.base.KVStorage``;
attention lives with the models).
"""

from __future__ import annotations

import torch

from sparsex.cache import blocks_for_tokens
from sparsex.models.base import KVRead, ModelSpec

MAX_READ_RUNS = 8
"""A sequence whose blocks form at most this many runs of consecutive blocks is read as slices
(attended in place); a more scattered one through a gather index."""


class KVCache:
    """K/V tensors of every layer. Invariant: all layers share the same slot layout."""

    def __init__(
        self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        shape = (spec.num_layers, num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
        # One tensor per K and V so that moving a segment touches every layer in one op.
        self.k = torch.empty(shape, dtype=dtype, device=device)  # [L, S, Hkv, D]
        self.v = torch.empty(shape, dtype=dtype, device=device)
        # Uninitialised on purpose: a slot is always written before any read of it.

    @staticmethod
    def bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem

    def slots(self, block_table: list[int], positions: torch.Tensor) -> torch.Tensor:
        """[n] flat slots of ``positions`` in a sequence with ``block_table``."""
        table = torch.tensor(block_table, dtype=torch.int64, device=positions.device)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def reader(self, block_table: list[int], ctx_len: int, device: torch.device) -> KVRead:
        """How to read positions 0..ctx_len-1 (see :data:`KVRead`)::

            table [7, 8, 9, 2, 3]   bs = 4, ctx_len = 18   ->  (slice(28, 40), slice(8, 14))
                   └ run ┘ └run┘                                blocks 7-9       2-3 (6 positions)
        """
        bs, nb = self.block_size, blocks_for_tokens(ctx_len, self.block_size)
        runs: list[list[int]] = []  # [first block, number of blocks]
        for b in block_table[:nb]:
            if runs and b == runs[-1][0] + runs[-1][1]:
                runs[-1][1] += 1
            else:
                runs.append([b, 1])
        if len(runs) > MAX_READ_RUNS:
            return self.slots(block_table, torch.arange(ctx_len, device=device))
        slices, left = [], ctx_len
        for first, count in runs:
            size = min(count * bs, left)
            slices.append(slice(first * bs, first * bs + size))
            left -= size
        return slices[0] if len(slices) == 1 else tuple(slices)

    def read(self, layer: int, read: KVRead) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(read, tuple):
            return torch.cat([self.k[layer][r] for r in read]), torch.cat([self.v[layer][r] for r in read])
        return self.k[layer][read], self.v[layer][read]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k.to(self.dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.dtype))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of layer ``layer``'s K, V at ``slots``: [n, Hkv, D] each (in the storage dtype)."""
        return self.k[layer].index_select(0, slots), self.v[layer].index_select(0, slots)

    def add(self, layer: int, slots: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
        """Add ``dk``, ``dv`` ([n, Hkv, D]) to layer ``layer``'s K, V at ``slots`` (in place)."""
        self.k[layer].index_add_(0, slots, dk.to(self.dtype))
        self.v[layer].index_add_(0, slots, dv.to(self.dtype))

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy K/V of every layer from slots ``src`` to slots ``dst``."""
        self.k.index_copy_(1, dst, self.k[:, src])
        self.v.index_copy_(1, dst, self.v[:, src])

