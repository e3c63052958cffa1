"""PrefixCache: exact prefix caching over full blocks (vLLM-style chained hashes).

A request's block table is prompt-aligned: block ``i`` holds tokens ``[i*B, (i+1)*B)`` at
positions ``i*B...``, so a cached prefix block is reused at the very position it was computed at
and its KV is exact. Only full blocks are hashed; the partial tail is never shared::

    B = 4, prompt of 10 tokens, num_exact_tokens = 10
    tokens  | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 . . |
    table   |   block 7   |   block 2   |  block 5  |
    hashes  |     h0      |  h1(h0,..)  |  (none: partial, never published)
"""

from __future__ import annotations

from collections.abc import Sequence

from sparsex.cache.block_pool import BlockPool
from sparsex.cache.hashing import BlockHash, HashFn, default_hash_fn, hash_block, walk_chain
from sparsex.cache.listener import BlockListener, StoredBlocks

PREFIX_DOMAIN = "prefix"
"""Domain tag in every prefix hash, so prefix and segment entries never hit each other."""


class PrefixCache:
    """Publishes and matches the leading full blocks of prompts.

    Invariants:
    - Every hash is salted with ``(model_id, namespace, "prefix")``: no cross-model or cross-tenant
      hits, and no hits on segment entries of the same pool.
    - A match is verified token by token (:meth:`BlockPool.lookup`): a colliding hash ends the match.
    - Only blocks whose every token has exact KV are published.
    - The cache takes no reference of its own: a published block lives on in the pool's LRU list
      after its request releases it, until the pool reuses it.
    - ``listener`` (if any) is told of every block :meth:`register` newly publishes.
    """

    def __init__(
        self, pool: BlockPool, model_id: str, hash_fn: HashFn = default_hash_fn, listener: BlockListener | None = None
    ) -> None:
        self._pool = pool
        self._model_id = model_id
        self._hash_fn = hash_fn
        self._listener = listener

    @property
    def pool(self) -> BlockPool:
        return self._pool

    def match(self, token_ids: Sequence[int], namespace: str) -> list[int]:
        """Block ids of the longest cached run of leading full blocks of ``token_ids``.

        Takes a reference on each returned block; the caller releases them with the request.
        All matched blocks are returned, even one that covers the prompt's last token: the engine
        decides what to recompute."""
        block_ids = walk_chain(token_ids, self._pool.block_size, self._salt(namespace), self._hash_fn,
                               self._pool.lookup, partial_last=False)
        self._pool.incref(block_ids)
        return block_ids

    def register(
        self, token_ids: Sequence[int], block_ids: Sequence[int], namespace: str, num_exact_tokens: int
    ) -> int:
        """Publish the leading full blocks of a request whose tokens are all ``< num_exact_tokens``.

        ``block_ids`` is the request's block table (block ``i`` holds tokens ``[i*B, (i+1)*B)``).
        References are unchanged (the request still owns its blocks). Blocks already published
        (e.g. earlier prefix hits) are skipped. Returns the number of blocks newly published."""
        block_size = self._pool.block_size
        num_exact = min(num_exact_tokens, len(token_ids), len(block_ids) * block_size)
        salt = self._salt(namespace)
        published: list[tuple[int, int]] = []
        parent: BlockHash | None = None
        for index in range(num_exact // block_size):
            chunk = token_ids[index * block_size : (index + 1) * block_size]
            parent = hash_block(parent, chunk, salt, self._hash_fn)
            was_published = self._pool.info(block_ids[index]).block_hash is not None
            # A duplicate of another block's content, or a hash collision, leaves it unpublished.
            self._pool.register(block_ids[index], parent, chunk, index * block_size)
            if not was_published and self._pool.info(block_ids[index]).block_hash is not None:
                published.append((index, block_ids[index]))
        if published and self._listener is not None:
            end = (published[-1][0] + 1) * block_size
            self._listener.blocks_stored(StoredBlocks(PREFIX_DOMAIN, namespace, tuple(token_ids[:end]), tuple(published)))
        return len(published)

    def _salt(self, namespace: str) -> tuple[str, ...]:
        return (self._model_id, namespace, PREFIX_DOMAIN)
