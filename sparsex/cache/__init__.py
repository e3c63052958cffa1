"""Pure-Python KV cache bookkeeping: block ids, hashes, token ids and positions (never tensors).

Layer map (see README.md): engine -> PrefixCache / SegmentIndex -> BlockPool. Importing this
package must never import torch or numpy.
"""

from sparsex.cache.block_pool import BlockInfo, BlockPool, NoFreeBlocksError, PressureHook, blocks_for_budget
from sparsex.cache.chunking import ChunkingConfig, chunk_tokens
from sparsex.cache.hashing import BlockHash, HashFn, default_hash_fn, hash_block, hash_chain
from sparsex.cache.prefix_cache import PrefixCache
from sparsex.cache.segment_index import PinnedSegment, SegmentHit, SegmentIndex

__all__ = [
    "BlockHash",
    "BlockInfo",
    "BlockPool",
    "ChunkingConfig",
    "HashFn",
    "NoFreeBlocksError",
    "PinnedSegment",
    "PrefixCache",
    "PressureHook",
    "SegmentHit",
    "SegmentIndex",
    "blocks_for_budget",
    "chunk_tokens",
    "default_hash_fn",
    "hash_block",
    "hash_chain",
]
