"""The ends of recent exact prompts: an exact repeat samples its first token with no forward pass.

The prefix cache holds a prompt's full blocks; the last token always runs again, and on a CPU a
forward pass of even one token reads every weight (~35 ms for SmolLM2 in fp32), most of an exact
repeat's time. For prompts computed exactly (no reused segment KV), this keeps what the prefix
cache cannot: the KV of the positions after the last full block it may serve (the partial tail,
1 to ``B`` tokens) and the next-token logits. A prompt whose leading full blocks all hit is then
complete: its tail KV is copied into its own block and its first token sampled from the kept
logits::

    B = 4, prompt of 10 tokens; the last token is never served by the prefix cache
    tokens   | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 |
    cache    |  prefix h0  |  prefix h1  | end: (h1, (t8, t9)) -> tail KV, logits

An end is keyed by the hash of the last full block before it (namespace-salted, verified token by
token by the prefix match) and its own token ids, so it is found only behind the very same exact
prefix; it never crosses tenants. Bounded, least recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from sparsex.cache import BlockPool
from sparsex.kv.paged import KVCache

CAPACITY = 32
"""Prompt ends kept (each: up to one block of KV and one logits vector)."""


@dataclass(frozen=True)
class PromptEnd:
    """keys, values: [L, t, Hkv, D] KV of the tail positions; logits: [V] of the last position."""

    keys: torch.Tensor
    values: torch.Tensor
    logits: torch.Tensor


class PromptEnds:
    """Bounded map of exact prompts' ends, keyed behind their exact prefix (see the module doc)."""

    def __init__(self, kv: KVCache, pool: BlockPool, capacity: int = CAPACITY) -> None:
        self.kv, self.pool, self.capacity = kv, pool, capacity
        self._ends: OrderedDict[Hashable, PromptEnd] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ends)

    def key(self, ids: Sequence[int], block_table: Sequence[int], namespace: str) -> Hashable | None:
        """The key of the prompt's end: the published hash of the last full block before the tail
        (the tail is the last ``1..B`` tokens), or the namespace when the prompt has no full block
        before it; None when that block is not published."""
        k = (len(ids) - 1) // self.pool.block_size
        tail = tuple(ids[k * self.pool.block_size :])
        if k == 0:
            return ("root", namespace, tail)
        block_hash = self.pool.info(block_table[k - 1]).block_hash
        return None if block_hash is None else (block_hash, tail)

    def remember(self, ids: Sequence[int], block_table: Sequence[int], namespace: str, logits: torch.Tensor) -> None:
        """Keep the end of a prompt whose KV (in ``block_table``) and ``logits`` were computed exactly."""
        key = self.key(ids, block_table, namespace)
        if key is None or self.capacity <= 0:
            return
        slots = self._tail_slots(ids, block_table)
        self._ends[key] = PromptEnd(self.kv.k[:, slots].clone(), self.kv.v[:, slots].clone(), logits.detach().clone())
        self._ends.move_to_end(key)
        while len(self._ends) > self.capacity:
            self._ends.popitem(last=False)

    def recall(self, ids: Sequence[int], block_table: Sequence[int], namespace: str) -> torch.Tensor | None:
        """If this prompt's end is kept, write its tail KV into ``block_table`` and return its logits."""
        key = self.key(ids, block_table, namespace)
        end = None if key is None else self._ends.get(key)
        if end is None:
            return None
        self._ends.move_to_end(key)
        slots = self._tail_slots(ids, block_table)
        self.kv.k[:, slots] = end.keys
        self.kv.v[:, slots] = end.values
        return end.logits.clone()

    def _tail_slots(self, ids: Sequence[int], block_table: Sequence[int]) -> torch.Tensor:
        bs = self.pool.block_size
        start = (len(ids) - 1) // bs * bs
        return self.kv.slots(list(block_table), torch.arange(start, len(ids), device=self.kv.k.device))
