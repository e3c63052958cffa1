"""BlockPool: reference counts, content hashes, LRU reuse and pinning of KV block ids.

The KV tensors live elsewhere (the model runner indexes them by block id); this
module only decides which id holds what. Life of a block:

              allocate()                   release() to ref 0, unpinned
    EMPTY ------------------> IN USE -------------------------------------> CACHED (free, LRU)
      ^                       |  ^  ^                                          |  |
      |   release(), no hash  |  |  +------------- incref() (a hit) -----------+  |
      +-----------------------+  +--- allocate() takes the LRU head, drops its ----+
                                      hash (lazy eviction), serves it as a new block

    IN USE = ref_count > 0 or pin_count > 0. A pinned block is never free, so never evicted.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sparsex.cache.hashing import BlockHash

PressureHook = Callable[[int], None]
"""Called with the number of blocks the pool would like returned to the free list."""

EvictHook = Callable[[int], None]
"""Called with a block id just before the pool drops that block's published content."""


class NoFreeBlocksError(RuntimeError):
    """Raised by :meth:`BlockPool.allocate` when fewer blocks are free than requested."""


@dataclass(frozen=True)
class BlockInfo:
    """A read-only snapshot of one block's metadata."""

    block_id: int
    """Index of the block in the KV tensors."""
    ref_count: int
    """Number of live users (requests, or the engine between a hit and its copy)."""
    pin_count: int
    """Number of pinned segments holding the block (0 = not pinned)."""
    block_hash: BlockHash | None
    """Hash the block's content is published under; None if it holds nothing reusable."""
    token_ids: tuple[int, ...]
    """Token ids whose KV the block holds (empty when unpublished)."""
    position: int | None
    """Absolute position the block's first token had when its KV was computed (for RoPE)."""
    num_hits: int
    """How many times a cache hit took a reference since the block was last allocated."""
    last_used: int
    """Pool clock at the block's last allocate/incref/release/pin/unpin."""


@dataclass(slots=True)
class _Block:
    """Mutable per-block state; fields as in :class:`BlockInfo`."""

    block_id: int
    ref_count: int = 0
    pin_count: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] = ()
    position: int | None = None
    num_hits: int = 0
    last_used: int = 0


class BlockPool:
    """Owns ``num_blocks`` KV block ids of ``block_size`` token slots each.

    Invariants:
    - A block is free iff ``ref_count == 0 and pin_count == 0``; every free block is in exactly one
      of two O(1) ordered lists: ``empty`` (no hash; a stack) or ``lru`` (hash kept; head = least
      recently freed). ``allocate`` takes from ``empty`` first, then the ``lru`` head.
    - ``block.block_hash is not None`` iff ``by_hash[block.block_hash] == block.block_id``: one block
      per hash, and a published block's token ids never change until it is reallocated.
    - Allocation is all or nothing: on :class:`NoFreeBlocksError` no block changed hands (segments
      the pressure hook already unpinned stay unpinned, still cached in the LRU).
    - Once pinned blocks exist and an allocation would leave more than ``high_water_blocks`` in use
      (or cannot be served), the pressure hook is asked to unpin some before blocks are taken.
    - Every dropped hash (reuse of an LRU block, :meth:`clear_cached`) is first told to the evict hook.
    """

    def __init__(self, num_blocks: int, block_size: int, high_water: float = 0.9) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0.0 < high_water <= 1.0:
            raise ValueError(f"high_water must be in (0, 1], got {high_water}")
        self._block_size = block_size
        self._high_water = high_water
        # round() first so that e.g. 0.29 * 100 = 28.999999999999996 counts as 29 blocks.
        self._high_water_blocks = math.floor(round(high_water * num_blocks, 9))
        self._blocks = [_Block(block_id) for block_id in range(num_blocks)]
        # A stack, block 0 on top: the most recently emptied blocks are reused first, so a busy
        # engine keeps cycling through memory that is already paged in and warm in cache rather
        # than touching every block of a large pool once (page faults on first touch).
        self._empty: OrderedDict[int, None] = OrderedDict.fromkeys(reversed(range(num_blocks)))
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._by_hash: dict[BlockHash, int] = {}
        self._num_pinned = 0
        self._clock = 0
        self._pressure_hook: PressureHook | None = None
        self._evict_hook: EvictHook | None = None

    # ----- sizes -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def high_water(self) -> float:
        return self._high_water

    @property
    def high_water_blocks(self) -> int:
        """Most blocks in use after an allocation before pinned segments are asked to yield."""
        return self._high_water_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._empty) + len(self._lru)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose content is published under a hash (in use or free)."""
        return len(self._by_hash)

    @property
    def num_pinned_blocks(self) -> int:
        return self._num_pinned

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    @property
    def clock(self) -> int:
        """Logical time: advances by one on every allocate/incref/release/pin/unpin."""
        return self._clock

    # ----- allocation and references -----------------------------------------------------------

    def set_pressure_hook(self, hook: PressureHook | None) -> None:
        """Install the callback that unpins segments under pressure (None removes it).

        The hook must only unpin; it must not allocate from this pool."""
        if hook is not None and self._pressure_hook is not None:
            raise ValueError("this BlockPool already has a pressure hook")
        self._pressure_hook = hook

    def set_evict_hook(self, hook: EvictHook | None) -> None:
        """Install the callback told of every evicted block (None removes it), e.g. so an index
        over block contents can forget it. It runs while the hash is still published and must not
        call back into this pool."""
        if hook is not None and self._evict_hook is not None:
            raise ValueError("this BlockPool already has an evict hook")
        self._evict_hook = hook

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks (ref_count 1, no hash): empty ones first, then LRU cached ones."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({num_blocks})")
        if num_blocks == 0:
            return []
        self._relieve_pressure(num_blocks)
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(
                f"cannot allocate {num_blocks} KV blocks: only {self.num_free_blocks} of "
                f"{self.num_blocks} are free ({self._num_pinned} pinned, the rest referenced by "
                "running requests); lower the load or give the KV cache more memory"
            )
        tick = self._tick()
        block_ids: list[int] = []
        for _ in range(num_blocks):
            if self._empty:
                block_id, _ = self._empty.popitem()
            else:
                block_id, _ = self._lru.popitem(last=False)
                self._evict(self._blocks[block_id])
            block = self._blocks[block_id]
            block.ref_count = 1
            block.last_used = tick
            block_ids.append(block_id)
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on each block (a cache hit); a free cached block leaves the LRU."""
        blocks = [self._get(block_id) for block_id in block_ids]
        for block in blocks:
            if self._is_free(block) and block.block_hash is None:
                raise ValueError(f"block {block.block_id} is free and holds nothing; allocate() it instead")
        tick = self._tick()
        for block in blocks:
            if self._is_free(block):
                del self._lru[block.block_id]
            block.ref_count += 1
            block.num_hits += 1
            block.last_used = tick

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block; at 0 an unpinned block becomes free.

        ``block_ids`` is in table order and joins the LRU tail in *reverse* order, so eviction takes
        a chain's last block before its first (a child block is useless once its parent is gone)."""
        blocks = [self._get(block_id) for block_id in block_ids]
        for block_id, count in Counter(block_ids).items():
            if self._blocks[block_id].ref_count < count:
                raise ValueError(
                    f"release of block {block_id} below zero references "
                    f"(ref_count {self._blocks[block_id].ref_count}, released {count} times)"
                )
        tick = self._tick()
        for block in reversed(blocks):
            block.ref_count -= 1
            block.last_used = tick
            if self._is_free(block):
                self._add_free(block)

    # ----- pinning -----------------------------------------------------------------------------

    def pin(self, block_ids: Iterable[int]) -> None:
        """Hold blocks out of the free list regardless of references (counted, so pins can nest)."""
        blocks = [self._get(block_id) for block_id in block_ids]
        for block in blocks:
            if self._is_free(block) and block.block_hash is None:
                raise ValueError(f"block {block.block_id} is free and holds nothing; cannot pin it")
        tick = self._tick()
        for block in blocks:
            if self._is_free(block):
                del self._lru[block.block_id]
            block.pin_count += 1
            block.last_used = tick
            if block.pin_count == 1:
                self._num_pinned += 1

    def unpin(self, block_ids: Sequence[int]) -> None:
        """Drop one pin per block; a block left unpinned and unreferenced joins the LRU (reversed,
        as in :meth:`release`), still hittable until reused."""
        blocks = [self._get(block_id) for block_id in block_ids]
        for block_id, count in Counter(block_ids).items():
            if self._blocks[block_id].pin_count < count:
                raise ValueError(f"unpin of block {block_id} which is not pinned {count} times")
        tick = self._tick()
        for block in reversed(blocks):
            block.pin_count -= 1
            block.last_used = tick
            if block.pin_count == 0:
                self._num_pinned -= 1
                if block.ref_count == 0:
                    self._add_free(block)

    # ----- content -----------------------------------------------------------------------------

    def register(self, block_id: int, block_hash: BlockHash, token_ids: Sequence[int], position: int) -> int:
        """Publish an in-use block's content under ``block_hash``; return the block now serving it.

        - hash not yet published: publishes ``block_id`` and returns it;
        - published by another block with the same token ids: first writer wins, returns that
          block (the caller may drop its duplicate; it must incref the winner to use it);
        - published with *different* token ids (a hash collision): returns ``block_id`` unpublished.
        Registering a block again under the same hash and tokens is a no-op."""
        block = self._get(block_id)
        tokens = tuple(token_ids)
        if self._is_free(block):
            raise ValueError(f"block {block_id} is free; allocate it before registering its content")
        if not 1 <= len(tokens) <= self._block_size:
            raise ValueError(f"a block holds 1..{self._block_size} tokens, got {len(tokens)}")
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        if block.block_hash is not None:
            if block.block_hash == block_hash and block.token_ids == tokens:
                return block_id
            raise ValueError(f"block {block_id} is already published under another hash or content")
        existing = self._by_hash.get(block_hash)
        if existing is not None:
            return existing if self._blocks[existing].token_ids == tokens else block_id
        block.block_hash = block_hash
        block.token_ids = tokens
        block.position = position
        self._by_hash[block_hash] = block_id
        return block_id

    def lookup(self, block_hash: BlockHash, token_ids: Sequence[int]) -> int | None:
        """The block published under ``block_hash`` if it holds exactly ``token_ids``, else None.

        Takes no reference: call :meth:`incref` before anything can allocate."""
        block_id = self._by_hash.get(block_hash)
        if block_id is None or self._blocks[block_id].token_ids != tuple(token_ids):
            return None
        return block_id

    def info(self, block_id: int) -> BlockInfo:
        b = self._get(block_id)
        return BlockInfo(
            b.block_id,
            b.ref_count,
            b.pin_count,
            b.block_hash,
            b.token_ids,
            b.position,
            b.num_hits,
            b.last_used,
        )

    def clear_cached(self) -> int:
        """Evict every free cached block now (e.g. between benchmark runs); returns how many."""
        num_evicted = len(self._lru)
        while self._lru:
            block_id, _ = self._lru.popitem(last=False)
            self._evict(self._blocks[block_id])
            self._empty[block_id] = None
        return num_evicted

    # ----- internals ---------------------------------------------------------------------------

    def _relieve_pressure(self, num_blocks: int) -> None:
        shortfall = num_blocks - self.num_free_blocks
        over_mark = self.num_used_blocks + num_blocks - self._high_water_blocks
        wanted = max(shortfall, over_mark)
        if wanted > 0 and self._num_pinned > 0 and self._pressure_hook is not None:
            self._pressure_hook(wanted)

    def _get(self, block_id: int) -> _Block:
        if not 0 <= block_id < len(self._blocks):
            raise ValueError(f"block id {block_id} out of range [0, {len(self._blocks)})")
        return self._blocks[block_id]

    @staticmethod
    def _is_free(block: _Block) -> bool:
        return block.ref_count == 0 and block.pin_count == 0

    def _add_free(self, block: _Block) -> None:
        if block.block_hash is None:
            self._empty[block.block_id] = None
        else:
            self._lru[block.block_id] = None

    def _evict(self, block: _Block) -> None:
        """Drop a block's published content (lazily, when the block is about to be reused)."""
        if block.block_hash is not None:
            if self._evict_hook is not None:
                self._evict_hook(block.block_id)
            del self._by_hash[block.block_hash]
        block.block_hash = None
        block.token_ids = ()
        block.position = None
        block.num_hits = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens (the last one possibly partial)."""
    return -(-num_tokens // block_size)


def blocks_for_budget(bytes_per_block: int, budget: int | float, available_bytes: int) -> int:
    """Number of KV blocks that fit a memory budget.

    ``budget`` is either bytes (an ``int``) or a fraction of ``available_bytes`` (a ``float`` in
    (0, 1]). Raises ValueError when the inputs are invalid or the budget holds no block at all."""
    if isinstance(bytes_per_block, bool) or not isinstance(bytes_per_block, int) or bytes_per_block < 1:
        raise ValueError(f"bytes_per_block must be a positive int, got {bytes_per_block!r}")
    if isinstance(available_bytes, bool) or not isinstance(available_bytes, int) or available_bytes < 0:
        raise ValueError(f"available_bytes must be an int >= 0, got {available_bytes!r}")
    if isinstance(budget, bool):
        raise ValueError(f"budget must be bytes (int) or a fraction (float), got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"a byte budget must be >= 1, got {budget}")
        if budget > available_bytes:
            raise ValueError(f"budget of {budget} bytes exceeds the {available_bytes} bytes available")
        budget_bytes = budget
    elif isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(
                f"a float budget is a fraction of available memory in (0, 1], got {budget}; "
                "pass an int to give bytes"
            )
        budget_bytes = int(budget * available_bytes)
    else:
        raise ValueError(f"budget must be bytes (int) or a fraction (float), got {budget!r}")
    num_blocks = budget_bytes // bytes_per_block
    if num_blocks < 1:
        raise ValueError(f"a budget of {budget_bytes} bytes holds no KV block of {bytes_per_block} bytes")
    return num_blocks
