"""Engine configuration (pure Python): every option of an engine, checked when it is made."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypedDict

KV_DTYPES = ("float32", "bfloat16", "float16")
"""Storage dtypes of the KV pool and of the store tiers."""


@dataclass(frozen=True)
class EngineConfig:
    """How an engine is built.

    model: alias (``smollm2``, ``gemma3-270m``), a .gguf file, a model folder or a Hugging Face Hub
        id (``org/name``, ``org/name:file.gguf``); None = the default.
    device: ``cpu`` or ``cuda`` (compute is float32).
    kv_dtype: storage dtype of the KV cache (one of :data:`KV_DTYPES`).
    block_size: tokens per KV block.
    kv_cache_memory: KV pool size: bytes (int) or a fraction of available memory (float in (0, 1]).
    max_kv_cache_bytes: cap applied when kv_cache_memory is a fraction.
    max_num_seqs: most requests admitted at once.
    high_water: pool usage above which pinned segments start to be dropped.
    max_prefill_tokens: most prompt tokens' worth of work one engine step runs for a prefill (a full
        prefill runs that many tokens through every layer, a reuse prefill about as many
        token-layers), so that other requests' steps interleave; None = unbounded.
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
    kv_events: Any = None  # str | KVEventsConfig: typed loosely, this layer imports no I/O package

    def __post_init__(self) -> None:
        mpt = self.max_prefill_tokens
        if mpt is not None and (isinstance(mpt, bool) or not isinstance(mpt, int) or mpt < 1):
            raise ValueError(f"max_prefill_tokens must be a positive int or None (unbounded), got {mpt!r}")
        for name in ("kv_dtype", "kv_store_dtype"):
            if getattr(self, name) not in KV_DTYPES:
                raise ValueError(f"{name} must be one of {sorted(KV_DTYPES)}, got {getattr(self, name)!r}")
        for name in ("block_size", "max_num_seqs", "max_kv_cache_bytes", "kv_disk_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 < self.high_water <= 1.0:
            raise ValueError(f"high_water must be in (0, 1], got {self.high_water!r}")


class EngineOptions(TypedDict, total=False):
    """``EngineConfig``'s fields but ``model`` as keyword arguments (``LLM(model, kv_cache_memory=...)``)."""

    device: str
    kv_dtype: str
    block_size: int
    kv_cache_memory: int | float
    max_kv_cache_bytes: int
    max_num_seqs: int
    high_water: float
    max_prefill_tokens: int | None
    kv_store: str | None
    kv_disk: str | None
    kv_disk_bytes: int
    kv_store_dtype: str
    revision: str | None
    kv_events: Any


CONFIG_FIELDS = tuple(f.name for f in fields(EngineConfig))


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
