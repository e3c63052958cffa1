"""Quality harness: every reuse method against full prefill (method ``none``) on a workload.

For each work item: run its warm-up prompts (so its segments are cached, computed in another
context), then the test prompt with the reference and with each method, and compare the
first-token distribution (top-1 agreement, KL), the greedy continuation (matching prefix length),
task accuracy where there is an answer, TTFT and the fraction of prefill compute spent.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from sparsex.lab.workloads import WorkItem
from sparsex.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sparsex.engine import LLM, RequestOutput


@dataclass(frozen=True)
class MethodSpec:
    """A method under test: a label and the reuse options it runs with (``method`` included)."""

    label: str
    options: tuple[tuple[str, Any], ...]

    @property
    def reuse(self) -> dict[str, Any]:
        return dict(self.options)


def parse_method(text: str, **defaults: Any) -> MethodSpec:
    """``"sparsex:hybrid=false,boundary=8"`` -> MethodSpec (values parsed as bool/int/float/str)."""
    name, _, rest = text.partition(":")
    opts: dict[str, Any] = {"method": name, **{k: v for k, v in defaults.items() if v is not None}}
    for kv in filter(None, rest.split(",")):
        key, _, raw = kv.partition("=")
        opts[key.strip()] = _parse_value(raw.strip())
    return MethodSpec(text, tuple(sorted(opts.items())))


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


@dataclass
class RunResult:
    """One method on one item.

    top1: the first token equals the reference's. kl: KL(reference || method) of the next-token
    distribution. match_len: leading tokens of the greedy continuation equal to the reference's.
    correct: the answer appears in the continuation (None when the item has no answer).
    """

    item: str
    kind: str
    method: str
    top1: bool
    kl: float
    match_len: int
    correct: bool | None
    ttft_s: float
    compute_fraction: float
    recomputed_fraction: float
    segment_hit_fraction: float
    prompt_tokens: int


def kl_divergence(ref: torch.Tensor, lp: torch.Tensor) -> float:
    """KL(reference || method) of two next-token log-probability vectors (clamped at 0)."""
    return float(torch.sum(ref.exp() * (ref - lp)).clamp_min(0.0))


def run_greedy(llm: LLM, prompt: list[Any], reuse: dict[str, Any], n_tokens: int) -> tuple[torch.Tensor, RequestOutput]:
    """Greedy ``n_tokens`` of ``prompt``: (first-token log-probabilities, the output)."""
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    req = llm.add_request(prompt, params, reuse=reuse, keep_first_logits=True)
    out = llm.run_to_completion([req])[0]
    assert out.first_logprobs is not None
    return torch.from_numpy(out.first_logprobs), out


def evaluate_item(
    llm: LLM, item: WorkItem, methods: list[MethodSpec], namespace: str, continuation: int = 32
) -> list[RunResult]:
    """Warm the cache with ``item.warmup``, then run the reference and every method."""
    for warm in item.warmup:
        run_greedy(llm, warm, {"method": "none", "namespace": namespace}, 1)
    ref_lp, ref = run_greedy(llm, item.prompt, {"method": "none", "register": False, "namespace": namespace},
                       continuation)
    out = [RunResult(
        item=item.name, kind=item.kind, method="none", top1=True, kl=0.0, match_len=len(ref.token_ids),
        correct=None if item.answer is None else item.answer.lower() in ref.text.lower(),
        ttft_s=ref.metrics.ttft_s, compute_fraction=1.0, recomputed_fraction=1.0, segment_hit_fraction=0.0,
        prompt_tokens=ref.metrics.num_prompt_tokens,
    )]
    for spec in methods:
        reuse = {**spec.reuse, "register": False, "namespace": namespace}
        lp, req = run_greedy(llm, item.prompt, reuse, continuation)
        kl = kl_divergence(ref_lp, lp)
        match = 0
        for a, b in zip(req.token_ids, ref.token_ids, strict=False):
            if a != b:
                break
            match += 1
        m, n = req.metrics, req.metrics.num_prompt_tokens
        out.append(RunResult(
            item=item.name, kind=item.kind, method=spec.label,
            top1=req.token_ids[0] == ref.token_ids[0], kl=kl, match_len=match,
            correct=None if item.answer is None else item.answer.lower() in req.text.lower(),
            ttft_s=m.ttft_s, compute_fraction=m.compute_fraction,
            recomputed_fraction=m.num_recomputed_tokens / n, segment_hit_fraction=m.num_segment_hit_tokens / n,
            prompt_tokens=n,
        ))
    return out


def summarize(results: list[RunResult]) -> list[dict[str, Any]]:
    """Per (workload kind, method): means, accuracy, median TTFT and the share of naive's KL gap closed."""
    groups: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for r in results:
        groups[(r.kind, r.method)].append(r)
    naive_kl = {k: statistics.mean(r.kl for r in rs) for (k, m), rs in groups.items() if m == "naive"}
    rows = []
    for (kind, method), rs in groups.items():
        kl = statistics.mean(r.kl for r in rs)
        answered = [r.correct for r in rs if r.correct is not None]
        base = naive_kl.get(kind)
        rows.append({
            "kind": kind, "method": method, "n": len(rs),
            "top1": statistics.mean(float(r.top1) for r in rs), "kl": kl,
            "gap_closed": (1.0 - kl / base) if base else None,
            "match32": statistics.mean(r.match_len for r in rs),
            "accuracy": statistics.mean(float(a) for a in answered) if answered else None,
            "ttft_s": statistics.median(r.ttft_s for r in rs),
            "cost": statistics.mean(r.compute_fraction for r in rs),
            "recomputed": statistics.mean(r.recomputed_fraction for r in rs),
            "reused": statistics.mean(r.segment_hit_fraction for r in rs),
            "tokens": statistics.mean(r.prompt_tokens for r in rs),
        })
    return rows


def as_dicts(results: list[RunResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
