"""Per-request state: everything a request carries through its life (pure Python: the tensors it
holds are only typed here, never imported)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sparsex.cache import blocks_for_tokens
from sparsex.detokenize import IncrementalText
from sparsex.kv.policy import CachePolicy
from sparsex.reuse.options import ReuseOptions
from sparsex.sampling_params import SamplingParams
from sparsex.segments import SegmentSpan

if TYPE_CHECKING:
    import torch

    from sparsex.core.prefill import PrefillTask, RecalledPrefill

DEFAULT_TENANT = "default"
"""The tenant of requests that name none (the Python API; the server without API keys)."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class PinSpec:
    """A request that pins a document instead of generating: its prompt is BOS + the document.

    namespace: the tenant namespace of the pinned segment. name: an optional label.
    num_doc_tokens: the document's tokens (the prompt's last ones).
    """

    namespace: str
    name: str | None
    num_doc_tokens: int


@dataclass
class RequestMetrics:
    """Timings and cache statistics of one request.

    ttft_s: seconds from arrival to the first token.
    latency_s: seconds from arrival to the last token.
    num_prompt_tokens: prompt length in tokens.
    num_prefix_hit_tokens: prompt tokens served exactly by the prefix cache.
    num_segment_hit_tokens: prompt tokens whose KV came from cached segments.
    num_recomputed_tokens: prompt tokens that ran through the sparse (post-boundary) layers.
    compute_fraction: fraction of a full prefill's per-layer token work actually done.
    segment_sources: how many segments the prompt has per source (explicit, chat, auto).
    segment_hit_tokens_by_source: reused tokens per source of the prompt segment they sit in
        (``explicit``, ``chat`` messages, ``pinned``; ``auto`` for plain text).
    num_reused_runs: cached token runs the prompt reused (each from one entry, at any offset).
    num_seam_lost_tokens: tokens of prompt segments found in part but not these (seams, edits).
    reuse_overhead_s: seconds spent finding cached KV and loading/aligning it into the request
        (``lookup_s + load_s``).
    lookup_s: seconds of admission: cutting the prompt's text into chunks, the prefix and run
        lookups, block allocation.
    load_s: seconds spent copying the hits' KV into the request's blocks, keys realigned.
    reuse: the reuse method that served the request.
    """

    ttft_s: float = 0.0
    latency_s: float = 0.0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    num_segment_hit_tokens: int = 0
    num_recomputed_tokens: int = 0
    compute_fraction: float = 1.0
    segment_sources: dict[str, int] = field(default_factory=dict)
    segment_hit_tokens_by_source: dict[str, int] = field(default_factory=dict)
    num_reused_runs: int = 0
    num_seam_lost_tokens: int = 0
    lookup_s: float = 0.0
    load_s: float = 0.0
    reuse: str = "none"

    @property
    def reuse_overhead_s(self) -> float:
        return self.lookup_s + self.load_s


@dataclass
class KeptLogits:
    """Distributions a request keeps for analysis (``keep_first_logits``).

    steps_wanted: how many generated tokens' distributions to keep.
    first: the first token's logits and the prompt positions the prefill recomputed.
    steps: log-probabilities of each kept generated token.
    """

    steps_wanted: int
    first: tuple[torch.Tensor, torch.Tensor] | None = None
    steps: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Request:
    """A prompt being served. Invariant: ``block_table`` covers every computed KV position.

    tenant: who the request is served for; the scheduler shares the engine fairly between tenants
        (the server sets it from the API key). It does not namespace the cache: ``reuse.namespace``
        does.
    num_computed_tokens: positions whose KV is computed (a prefix-cache hit counts from admission).
    last_prefill_turn: the scheduler's bookkeeping: its tenant's prefill turn when it last ran a
        chunk (or was admitted).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    spans: list[SegmentSpan] = field(default_factory=list)
    tenant: str = DEFAULT_TENANT
    reuse: ReuseOptions = field(default_factory=ReuseOptions)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_reserved_blocks: int = 0
    last_prefill_turn: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    text: str = ""
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    followers: list[Request] = field(default_factory=list)
    """Other choices of the same prompt (``n`` > 1): admitted with this one, they copy its prompt
    KV once its prefill is done instead of prefilling again."""
    pin: PinSpec | None = None
    pinned_segment_id: str | None = None
    """For a pin request: the pinned segment's id once done."""
    prefill: PrefillTask | RecalledPrefill | None = None
    """Its prefill while under way (set at admission, cleared when the prompt is done)."""
    generator: torch.Generator | None = None
    """Its sampling generator (seeded requests)."""
    kept: KeptLogits | None = None
    """What it keeps for analysis, if asked."""
    error: Exception | None = None
    """What failed it (``finish_reason == "error"``), until collected."""
    detokenizer: IncrementalText = field(default_factory=IncrementalText)

    @property
    def cache(self) -> CachePolicy:
        """The request's cache policy (namespace, what it publishes)."""
        return self.reuse.cache

    @property
    def uses_prefix(self) -> bool:
        return self.reuse.uses_prefix

    @property
    def reuses_segments(self) -> bool:
        return self.reuse.reuses_segments

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens_left(self) -> int:
        """Prompt positions still to prefill (a reuse prefill: its work left, in full-prefill tokens)."""
        return len(self.prompt_token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def blocks_needed(self, block_size: int) -> int:
        """Blocks for the whole prompt plus every token it may generate."""
        total = len(self.prompt_token_ids) + self.params.max_tokens
        return blocks_for_tokens(total, block_size)
