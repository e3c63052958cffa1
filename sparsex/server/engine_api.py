"""What the server needs from the engine: the ``ServedLLM`` Protocol, which ``sparsex.LLM`` satisfies.

The server is typed against this interface, not against the engine class, and probes nothing at
run time: a method the server calls is listed here with its signature. mypy checks that
``sparsex.LLM`` satisfies it where ``sparsex serve`` hands an ``LLM`` to ``create_app``, and
``tests/server/test_engine_api.py`` checks the parameters at run time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from sparsex.core.request import DEFAULT_TENANT, Request
from sparsex.reuse.options import ReuseOptions
from sparsex.sampling_params import SamplingParams
from sparsex.tokenizer import Tokenizer


class ModelLimits(Protocol):
    """The part of the model spec the server reads."""

    @property
    def max_position(self) -> int:
        """The context length in tokens."""
        ...

    @property
    def vocab_size(self) -> int: ...


class PoolCounters(Protocol):
    """The KV block pool's counters, read (at scrape time) by ``/metrics``."""

    @property
    def num_blocks(self) -> int: ...

    @property
    def num_free_blocks(self) -> int: ...

    @property
    def num_pinned_blocks(self) -> int: ...

    @property
    def usage(self) -> float: ...


class ServedLLM(Protocol):
    """The engine calls the server makes, all from the engine thread (the engine is not thread-safe).

    reuse: the engine's default reuse options; the server reads ``reuse.namespace``.
    """

    model_name: str

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def reuse(self) -> ReuseOptions: ...

    @property
    def spec(self) -> ModelLimits: ...

    @property
    def pool(self) -> PoolCounters: ...

    def add_tokenized(
        self,
        ids: list[int],
        params: SamplingParams,
        spans: Sequence[Any] = (),
        request_id: str | None = None,
        reuse: str | ReuseOptions | Mapping[str, Any] | None = None,
    ) -> Request: ...

    def add_choices(
        self,
        ids: list[int],
        params: Sequence[SamplingParams],
        spans: Sequence[Any] = (),
        request_ids: Sequence[str] | None = None,
        reuse: str | ReuseOptions | Mapping[str, Any] | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> list[Request]:
        """``len(params)`` choices of one prompt sharing one prefill, scheduled for ``tenant``."""
        ...

    def step(self) -> list[Request]: ...

    def abort(self, req: Request) -> None: ...

    def has_unfinished(self) -> bool: ...

    def add_pin(self, doc: str | list[int], namespace: str = "", name: str | None = None,
                tenant: str = DEFAULT_TENANT) -> Request:
        """Queue the pinning of one document; its ``pinned_segment_id`` is set when it finishes."""
        ...

    def error_of(self, req: Request) -> Exception | None:
        """The exception that failed ``req`` (``finish_reason == "error"``); the engine forgets it."""
        ...

    def uncache_segments(self, segment_ids: Sequence[str]) -> int:
        """Unpin segments; returns how many were found."""
        ...

    def list_segments(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Pinned segments: ``{"id", "name", "namespace", "num_tokens", "num_blocks", "num_hits"}``."""
        ...

    def cache_entries(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Store entries the pool holds: ``{"key", "namespace", "num_tokens", "position", "segment_id"}``."""
        ...

    def cache_events(self, since: int = 0) -> list[dict[str, Any]]:
        """Store events after ``since``: ``{"seq", "kind", "key", "namespace", "num_tokens", "tier"}``."""
        ...


def context_limit(llm: ServedLLM) -> int:
    return int(llm.spec.max_position)
