"""Prometheus metrics in the text exposition format, written by hand (no client library needed).

Counters and histograms are updated on the event loop thread only (when a request finishes);
KV pool gauges are read at scrape time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sparsex.request import RequestMetrics
    from sparsex.server.engine_api import ServedLLM
    from sparsex.server.engine_loop import EngineLoop

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FRACTION_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 0.9, 1.0)


@dataclass
class Histogram:
    """Cumulative-bucket histogram; ``counts[i]`` counts observations <= ``buckets[i]``."""

    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    num: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.num += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for b, c in zip(self.buckets, self.counts, strict=True):
            lines.append(f'{name}_bucket{{le="{b}"}} {c}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.num}', f"{name}_sum {self.total}", f"{name}_count {self.num}"]
        return lines


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in pairs)
    return f"{{{inner}}}" if inner else ""


class ServerMetrics:
    """Everything ``GET /metrics`` reports."""

    def __init__(self) -> None:
        self.http_requests: Counter[tuple[tuple[str, str], ...]] = Counter()
        self.finished: Counter[tuple[tuple[str, str], ...]] = Counter()
        self.num_rejected = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_prefix_hit_tokens = 0
        self.num_segment_hit_tokens = 0
        self.num_recomputed_tokens = 0
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.compute_fraction = Histogram(FRACTION_BUCKETS)

    def count_http(self, path: str, status: int) -> None:
        self.http_requests[(("path", path), ("status", str(status)))] += 1
        if status == 429:
            self.num_rejected += 1

    def observe_request(self, m: RequestMetrics, finish_reason: str | None) -> None:
        """One engine request finished (every choice of an ``n > 1`` request counts)."""
        self.finished[(("finish_reason", finish_reason or "unknown"), ("reuse", m.reuse))] += 1
        self.num_prompt_tokens += m.num_prompt_tokens
        self.num_generation_tokens += m.num_generated_tokens
        self.num_prefix_hit_tokens += m.num_prefix_hit_tokens
        self.num_segment_hit_tokens += m.num_segment_hit_tokens
        self.num_recomputed_tokens += m.num_recomputed_tokens
        if m.num_generated_tokens > 0:
            self.ttft.observe(m.ttft_s)
        self.latency.observe(m.latency_s)
        self.compute_fraction.observe(m.compute_fraction)

    def render(self, llm: ServedLLM, engine: EngineLoop) -> str:
        lines: list[str] = []

        def scalar(name: str, kind: str, help_text: str, value: float) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"])

        def labelled(name: str, help_text: str, values: Counter[tuple[tuple[str, str], ...]]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} counter"])
            lines.extend(f"{name}{_labels(k)} {v}" for k, v in sorted(values.items()))

        labelled("sparsex_http_requests_total", "HTTP requests by path and status code.", self.http_requests)
        labelled("sparsex_requests_total", "Finished engine requests by finish reason and reuse method.",
                 self.finished)
        scalar("sparsex_requests_rejected_total", "counter", "Requests refused with 429 (queue full).",
               self.num_rejected)
        scalar("sparsex_requests_aborted_total", "counter", "Requests aborted (client gone, shutdown).",
               engine.num_aborted)
        scalar("sparsex_requests_inflight", "gauge", "Engine requests waiting or running.", engine.num_inflight)
        scalar("sparsex_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
               self.num_prompt_tokens)
        scalar("sparsex_generation_tokens_total", "counter", "Generated tokens.", self.num_generation_tokens)
        scalar("sparsex_prefix_hit_tokens_total", "counter", "Prompt tokens served by the exact prefix cache.",
               self.num_prefix_hit_tokens)
        scalar("sparsex_segment_hit_tokens_total", "counter", "Prompt tokens whose KV came from cached segments.",
               self.num_segment_hit_tokens)
        scalar("sparsex_recomputed_tokens_total", "counter", "Prompt tokens recomputed.",
               self.num_recomputed_tokens)
        lines += self.ttft.render("sparsex_time_to_first_token_seconds", "Time to first token.")
        lines += self.latency.render("sparsex_e2e_request_latency_seconds", "Arrival to last token.")
        lines += self.compute_fraction.render(
            "sparsex_recompute_fraction", "Fraction of a full prefill's work done per request."
        )
        pool = llm.pool
        scalar("sparsex_kv_cache_usage", "gauge", "Fraction of KV blocks in use.", pool.usage)
        scalar("sparsex_kv_blocks_total", "gauge", "KV blocks in the pool.", pool.num_blocks)
        scalar("sparsex_kv_blocks_free", "gauge", "KV blocks free (empty or cached, evictable).",
               pool.num_free_blocks)
        scalar("sparsex_kv_blocks_pinned", "gauge", "KV blocks held by pinned segments.",
               getattr(pool, "num_pinned_blocks", 0))
        return "\n".join(lines) + "\n"
