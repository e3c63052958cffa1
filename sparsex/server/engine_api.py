"""What the server needs from the engine, as a Protocol that ``sparsex.LLM`` satisfies.

The server is typed against this interface, not against the engine class: the engine may grow
(reuse methods, pinned segments: found with ``hasattr`` / ``inspect``) without touching the server.
"""

from __future__ import annotations

from typing import Any, Protocol

from sparsex.cache.block_pool import BlockPool
from sparsex.request import Request
from sparsex.tokenizer import Tokenizer


class ServedLLM(Protocol):
    """The engine calls the server makes, all from the engine thread (the engine is not thread-safe).

    spec: the model spec; the server reads ``max_position`` (context limit) only.
    """

    model_name: str
    tokenizer: Tokenizer
    pool: BlockPool
    spec: Any

    def add_tokenized(self, *args: Any, **kwargs: Any) -> Request: ...

    def step(self) -> list[Request]: ...

    def abort(self, req: Request) -> None: ...

    def has_unfinished(self) -> bool: ...


def context_limit(llm: ServedLLM) -> int:
    return int(llm.spec.max_position)
