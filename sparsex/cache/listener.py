"""What the cache tells an observer (e.g. a KV event publisher): blocks published, blocks evicted.

The indexes report after they publish; the observer copies what it keeps and must not call back
into the cache. Nothing here knows how (or whether) the news travels further.

    chain of one prefix or one segment, B = 4       StoredBlocks(domain, namespace, token_ids, blocks)
    tokens   t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9        token_ids = t0..t9 (up to the last published block)
    index         0      |      1      |   2          blocks    = ((1, 17), (2, 5)): chain block 1 is now
    block id   (cached)  |     17      |   5                      published in pool block 17, block 2 in 5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StoredBlocks:
    """Blocks of one chain (a prompt's exact prefix, or one segment) just published in the pool.

    Chain block ``i`` holds ``token_ids[i*B : (i+1)*B]`` (B: the pool's block size); a segment's last
    block may be partial, prefix blocks are always full.
    """

    domain: str
    """``"prefix"`` (chained from the prompt's first token) or ``"segment"`` (chained from the segment's)."""
    namespace: str
    """The namespace salting the chain's hashes (a tenant's; ``""`` is the engine's shared default)."""
    token_ids: tuple[int, ...]
    """The chain's tokens from its first block to the end of the last block in ``blocks``."""
    blocks: tuple[tuple[int, int], ...]
    """``(index in the chain, pool block id)`` of each newly published block, ascending by index."""


class BlockListener(Protocol):
    """Told of every block an index publishes and every block the pool evicts."""

    def blocks_stored(self, stored: StoredBlocks) -> None:
        """Blocks were published (their content can be hit from now on)."""

    def block_removed(self, block_id: int) -> None:
        """The pool drops ``block_id``'s published content (told while it is still published)."""
