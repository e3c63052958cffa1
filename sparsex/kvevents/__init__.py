"""KV events in vLLM's wire format: what each replica's pool and store tiers hold, for routers.

Layer map (see README.md): engine -> KVEventRecorder (recorder.py: queue + thread)
-> EventBuilder (builder.py: state, hashing.py) -> EventBatch (wire.py) -> ZmqEventPublisher
(publisher.py). Imports no engine code: the cache and the store tiers report through their
listener protocols (``sparsex.cache.listener``, ``sparsex.kvstore.tiers.StoreListener``).
"""

from sparsex.kvevents.builder import EventBuilder
from sparsex.kvevents.config import KVEventsConfig
from sparsex.kvevents.hashing import SEGMENT_KEY, BlockHasher, cbor, external, sha256_cbor
from sparsex.kvevents.publisher import ZmqEventPublisher
from sparsex.kvevents.recorder import KVEventRecorder
from sparsex.kvevents.wire import (
    MEDIUM_DISK,
    MEDIUM_POOL,
    MEDIUM_REDIS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
)

__all__ = [
    "MEDIUM_DISK",
    "MEDIUM_POOL",
    "MEDIUM_REDIS",
    "SEGMENT_KEY",
    "AllBlocksCleared",
    "BlockHasher",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "EventBuilder",
    "KVEventRecorder",
    "KVEventsConfig",
    "ZmqEventPublisher",
    "cbor",
    "external",
    "sha256_cbor",
]
