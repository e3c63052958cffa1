"""``KVEventsConfig``: where and how an engine publishes its KV events."""

from __future__ import annotations

import os
from dataclasses import dataclass

from sparsex.kvevents.hashing import DEFAULT_SEED


@dataclass(frozen=True)
class KVEventsConfig:
    """KV events on a ZMQ PUB socket, in vLLM's format (``LLM(kv_events=...)``, ``--kv-events``).

    endpoint: where the PUB socket binds: ``tcp://*:5557`` (every interface), ``tcp://127.0.0.1:5557``
        (loopback), ``ipc:///run/sparsex-events``. Unlike vLLM, which connects to an address that has
        no ``*``, the engine always binds: subscribers (routers) connect to it.
    replay_endpoint: a ROUTER socket where a subscriber that missed batches asks for them again
        (vLLM's protocol: send the first wanted sequence number as 8 bytes big-endian); None: none.
    topic: the first frame of every message (subscribers filter on it); vLLM's default is ``""``.
    token_ids: publish the token ids of blocks in every namespace. Off (the default), only blocks of
        the shared namespace ``""`` carry their token ids; a tenant's (any other namespace) carry
        hashes only, so no subscriber learns another tenant's text. Namespaces are never published.
    hash_seed: the seed of a chain's first parent hash, vLLM's ``PYTHONHASHSEED`` (None: this
        process's ``PYTHONHASHSEED``, else vLLM's default ``"vllm-none-hash"``). Routers and vLLM
        replicas meant to agree must use the same value.
    buffer_steps: batches kept for replay. max_queue: most pending cache changes between the engine
        and the publisher thread; past it, changes are dropped and counted (never waited for).
    data_parallel_rank: the rank in every batch (vLLM's third field).
    """

    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    topic: str = ""
    token_ids: bool = False
    hash_seed: str | None = None
    buffer_steps: int = 10_000
    max_queue: int = 100_000
    data_parallel_rank: int = 0

    def __post_init__(self) -> None:
        for name, value in (("endpoint", self.endpoint), ("replay_endpoint", self.replay_endpoint)):
            if value is not None and not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"kv events {name} must start with tcp://, ipc:// or inproc://, got {value!r}")
        if self.buffer_steps < 1 or self.max_queue < 1:
            raise ValueError("buffer_steps and max_queue must be >= 1")

    @property
    def seed(self) -> str:
        """The hash seed in effect."""
        if self.hash_seed is not None:
            return self.hash_seed
        seed = os.environ.get("PYTHONHASHSEED")
        return DEFAULT_SEED if seed is None else seed

    @classmethod
    def of(cls, value: str | KVEventsConfig) -> KVEventsConfig:
        """An endpoint string or a config -> a config."""
        return value if isinstance(value, KVEventsConfig) else cls(endpoint=value)
