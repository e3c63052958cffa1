"""Engine configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class EngineConfig:
    """How an engine is built.

    model: alias (``smollm2``, ``gemma3-270m``), a .gguf file or a model folder; None = the default.
    device: ``cpu`` or ``cuda`` (compute is float32 on CPU).
    kv_dtype: storage dtype of the KV cache (``float32``, ``bfloat16``, ``float16``).
    block_size: tokens per KV block.
    kv_cache_memory: KV pool size: bytes (int) or a fraction of available memory (float in (0, 1]).
    max_kv_cache_bytes: cap applied when kv_cache_memory is a fraction.
    max_num_seqs: most requests decoding together.
    high_water: pool usage above which pinned segments start to be dropped.
    max_prefill_tokens: most prompt tokens one engine step runs for a request whose prefill
        recomputes everything (chunked prefill, so other requests' steps interleave); a reuse
        prefill runs whole. None = unbounded.
    kv_store: ``redis://host:port/db``: a Redis (or Valkey) tier shared by every replica (None: none).
    kv_disk: a folder for a local-disk tier (None: none); kv_disk_bytes: its byte budget.
    kv_store_dtype: K/V dtype in the tiers (``bfloat16``, ``float16``, or ``float32``: bitwise).
    revision: the branch, tag or commit of a Hugging Face Hub model (None: ``main``).
    kv_events: publish KV events in vLLM's format: an endpoint (``tcp://*:5557``) or a
        ``sparsex.kvevents.KVEventsConfig`` (None: no events).
    """

    model: str | None = None
    device: str = "cpu"
    kv_dtype: str = "float32"
    block_size: int = 16
    kv_cache_memory: int | float = 0.15
    max_kv_cache_bytes: int = 4 << 30
    max_num_seqs: int = 64
    high_water: float = 0.9
    max_prefill_tokens: int | None = 512
    kv_store: str | None = None
    kv_disk: str | None = None
    kv_disk_bytes: int = 8 << 30
    kv_store_dtype: str = "bfloat16"
    revision: str | None = None
    kv_events: Any = None  # str | KVEventsConfig (typed loosely: this layer imports no I/O package)


def available_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30
