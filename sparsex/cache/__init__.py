"""Pure-Python KV cache bookkeeping: block ids, hashes, token ids and positions (never tensors).

Layer map (see README.md): engine -> PrefixCache / SegmentIndex (-> RunMatcher) -> BlockPool.
Importing this package must never import torch or numpy.
"""

from sparsex.cache.block_pool import (
    BlockInfo,
    BlockPool,
    EvictHook,
    NoFreeBlocksError,
    PressureHook,
    blocks_for_budget,
    blocks_for_tokens,
)
from sparsex.cache.chunking import ChunkingConfig, chunk_tokens
from sparsex.cache.hashing import (
    BlockHash,
    HashFn,
    default_hash_fn,
    hash_block,
    hash_chain,
)
from sparsex.cache.listener import BlockListener, StoredBlocks
from sparsex.cache.prefix_cache import PrefixCache
from sparsex.cache.run_matcher import RunMatcher
from sparsex.cache.segment_index import PinnedSegment, SegmentHit, SegmentIndex
from sparsex.cache.token_runs import RunMatch, TokenRun, select_runs

__all__ = [
    "BlockHash",
    "BlockInfo",
    "BlockListener",
    "BlockPool",
    "ChunkingConfig",
    "EvictHook",
    "HashFn",
    "NoFreeBlocksError",
    "PinnedSegment",
    "PrefixCache",
    "PressureHook",
    "RunMatch",
    "RunMatcher",
    "SegmentHit",
    "SegmentIndex",
    "StoredBlocks",
    "TokenRun",
    "blocks_for_budget",
    "blocks_for_tokens",
    "chunk_tokens",
    "default_hash_fn",
    "hash_block",
    "hash_chain",
    "select_runs",
]
