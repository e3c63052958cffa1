"""``GET /metrics`` through ``prometheus_client`` (one registry per app).

Every label set is bounded: HTTP requests are labelled with the route *template*
(``/v1/segments/{segment_id}``, or ``unmatched``), a method from a fixed list and the status code,
never the raw path, so a client cannot inject lines or grow the exposition. Counters and histograms
are updated on the event loop thread; engine and KV pool gauges are read at scrape time.

With ``hide_cache_usage`` the cache counters (prefix / segment hit tokens, tokens found by source,
reused runs, tokens lost at seams, recomputed tokens, recompute fraction) are not registered at
all: they would show other users' activity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sparsex.kvstore.metrics import store_exposition
from sparsex.segments import SegmentSource

if TYPE_CHECKING:
    from sparsex.core.request import RequestMetrics
    from sparsex.server.engine_api import ServedLLM
    from sparsex.server.engine_loop import EngineLoop

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FRACTION_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 0.9, 1.0)
METHODS = ("GET", "POST", "DELETE")
FINISH_REASONS = ("stop", "length", "abort", "error")
FOUND_SOURCES = frozenset(get_args(SegmentSource))
"""Label values of ``sparsex_found_tokens{source}`` besides ``prefix`` (bounded: anything else is ``other``)."""


class ServerMetrics:
    """Everything ``GET /metrics`` reports.

    reuse_methods: the label values of ``reuse`` (anything else counts as ``other``).
    hide_cache_usage: leave out the cache counters (see the module doc).
    """

    def __init__(self, reuse_methods: tuple[str, ...] = (), hide_cache_usage: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reuse_methods = frozenset(reuse_methods)
        r = self.registry
        self.http = Counter("sparsex_http_requests", "HTTP requests by route template, method and status.",
                            ["route", "method", "status"], registry=r)
        self.finished = Counter("sparsex_requests", "Finished engine requests by finish reason and reuse method.",
                                ["finish_reason", "reuse"], registry=r)
        self.rejected = Counter("sparsex_requests_rejected", "Requests refused with 429 (queue full).", registry=r)
        self.aborted = Counter("sparsex_requests_aborted", "Engine requests aborted (client gone, shutdown).",
                               registry=r)
        self._num_aborted_seen = 0
        self.inflight = Gauge("sparsex_requests_inflight", "Engine requests waiting or running.", registry=r)
        self.prompt_tokens = Counter("sparsex_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("sparsex_generation_tokens", "Generated tokens.", registry=r)
        self.ttft = Histogram("sparsex_time_to_first_token_seconds", "Time to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("sparsex_e2e_request_latency_seconds", "Arrival to last token.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.cache: dict[str, Counter] = {}
        self.compute_fraction: Histogram | None = None
        if not hide_cache_usage:
            for name, text in (("prefix_hit", "Prompt tokens served by the exact prefix cache."),
                               ("segment_hit", "Prompt tokens whose KV came from cached segments."),
                               ("recomputed", "Prompt tokens recomputed.")):
                self.cache[name] = Counter(f"sparsex_{name}_tokens", text, registry=r)
            self.found = Counter("sparsex_found_tokens",
                                 "Prompt tokens served from cache, by where they were found: the exact prefix, "
                                 "or cached runs inside an explicit segment, a chat message, a pinned "
                                 "document's span, or plain text (auto).", ["source"], registry=r)
            self.runs = Counter("sparsex_reused_runs", "Cached token runs reused (each from one entry, any offset).",
                                registry=r)
            self.seam_lost = Counter("sparsex_seam_lost_tokens",
                                     "Tokens of prompt segments found in part but not these (lost at seams, edits).",
                                     registry=r)
            self.compute_fraction = Histogram("sparsex_recompute_fraction",
                                              "Fraction of a full prefill's work done per request.",
                                              buckets=FRACTION_BUCKETS, registry=r)
        self.kv_usage = Gauge("sparsex_kv_cache_usage", "Fraction of KV blocks in use.", registry=r)
        self.kv_blocks = Gauge("sparsex_kv_blocks", "KV blocks by state (total, free, pinned).",
                               ["state"], registry=r)

    def count_http(self, route: str, method: str, status: int) -> None:
        """One HTTP request; ``route`` must be a route template (or ``unmatched``), never a raw path."""
        self.http.labels(route, method if method in METHODS else "other", str(status)).inc()
        if status == 429:
            self.rejected.inc()

    def observe_request(self, m: RequestMetrics, finish_reason: str | None) -> None:
        """One engine request finished (every choice of an ``n > 1`` request counts)."""
        reason = finish_reason if finish_reason in FINISH_REASONS else "other"
        self.finished.labels(reason, m.reuse if m.reuse in self.reuse_methods else "other").inc()
        self.prompt_tokens.inc(m.num_prompt_tokens)
        self.generation_tokens.inc(m.num_generated_tokens)
        if m.num_generated_tokens > 0:
            self.ttft.observe(m.ttft_s)
        self.latency.observe(m.latency_s)
        if self.cache:
            self.cache["prefix_hit"].inc(m.num_prefix_hit_tokens)
            self.cache["segment_hit"].inc(m.num_segment_hit_tokens)
            self.cache["recomputed"].inc(m.num_recomputed_tokens)
            self.found.labels("prefix").inc(m.num_prefix_hit_tokens)
            for source, num in m.segment_hit_tokens_by_source.items():
                self.found.labels(source if source in FOUND_SOURCES else "other").inc(num)
            self.runs.inc(m.num_reused_runs)
            self.seam_lost.inc(m.num_seam_lost_tokens)
        if self.compute_fraction is not None:
            self.compute_fraction.observe(m.compute_fraction)

    def render(self, llm: ServedLLM, engine: EngineLoop) -> bytes:
        """The exposition, with the engine and pool gauges read now."""
        num_aborted = engine.num_aborted  # counted by the engine thread
        self.aborted.inc(max(0, num_aborted - self._num_aborted_seen))
        self._num_aborted_seen = max(self._num_aborted_seen, num_aborted)
        self.inflight.set(engine.num_inflight)
        pool = llm.pool
        self.kv_usage.set(pool.usage)
        self.kv_blocks.labels("total").set(pool.num_blocks)
        self.kv_blocks.labels("free").set(pool.num_free_blocks)
        self.kv_blocks.labels("pinned").set(pool.num_pinned_blocks)
        text = bytes(generate_latest(self.registry))
        if self.cache:  # the KV store tiers' counters (global registry; empty without tiers)
            text += store_exposition()
        return text
