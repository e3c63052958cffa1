"""Quality harness: every reuse method against full prefill (method ``none``) on a workload.

For each work item: run its warm-up prompts (so its segments are cached, computed in another
context), then the test prompt with the reference and with each method, and compare the
first-token distribution (top-1 agreement, KL), the next-token distributions over the first
``FORCED`` generated positions under teacher forcing (the reference's greedy tokens fed back into
the method's request, so both see the same context), the greedy continuation (matching prefix
length), task accuracy where there is an answer, TTFT and the fraction of prefill compute spent.

Teacher forcing uses the engine's ``SamplingParams.forced_token_ids``: the method's request decodes
the reference's tokens instead of its own, and ``keep_first_logits=n`` returns the distribution at
each step. A method whose own greedy tokens already equal the reference's over those positions saw
the same context, so its free run's distributions are used as they are (no second run).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sparsex.lab.stats import RESAMPLES, bootstrap_interval, gap_closed_of, mean_of, median_of
from sparsex.lab.workloads import WorkItem, answer_found
from sparsex.lab.workloads.common import Markup, markup_style, render_chat
from sparsex.lab.workloads.item import Chat, Prompt
from sparsex.lab.workloads.scoring import answer_f1
from sparsex.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sparsex.llm import LLM, RequestOutput


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


FORCED = 16
"""Generated positions compared under teacher forcing."""


@dataclass
class RunResult:
    """One method on one item.

    top1: the first token equals the reference's. kl: KL(reference || method) of the next-token
    distribution. kl_forced: the same averaged over the first ``FORCED`` generated positions under
    teacher forcing (position 0 is ``kl``); kl_steps: per position. match_len: leading tokens of
    the greedy continuation equal to the reference's. correct: the answer appears in the
    continuation (None when the item has no answer). f1: the continuation's answer F1 against the
    item's gold answers (real benchmarks; None otherwise). found: the share of the prompt's
    reusable tokens (see :func:`reusable_tokens`) served from cache. ttft_ratio: TTFT over the
    reference's (full prefill) on the same item, in the same run.
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
    kl_forced: float = 0.0
    kl_steps: list[float] = field(default_factory=list)
    f1: float | None = None
    found: float | None = None
    ttft_ratio: float | None = None


def kl_divergence(ref: torch.Tensor, lp: torch.Tensor) -> float:
    """KL(reference || method) of two next-token log-probability vectors (clamped at 0)."""
    return float(torch.sum(ref.exp() * (ref - lp)).clamp_min(0.0))


def step_kl(ref: torch.Tensor, lp: torch.Tensor) -> list[float]:
    """Per-position KL(reference || method) of two ``[n, V]`` log-probability tensors."""
    return [kl_divergence(a, b) for a, b in zip(ref, lp, strict=True)]


FOUND_WINDOW = 16
"""A prompt token is reusable when it lies in a run of this many tokens (one KV block) that also
occurs in a warm-up prompt."""


def to_parts(llm: LLM, prompt: Prompt) -> list[Any]:
    """What the engine is sent for a work item's prompt: its parts, or a chat rendered by the
    model's chat template (as the chat API does), or by the lab's markup for the model when it
    has none."""
    if not isinstance(prompt, Chat):
        return list(prompt)
    if llm.tokenizer.has_chat_template:
        return llm.tokenizer.chat_parts(prompt.as_dicts())
    return render_chat(prompt, Markup(markup_style(llm.tokenizer.token_id)))


def reusable_mask(prompt_ids: Sequence[int], warm_ids: Sequence[Sequence[int]], window: int = FOUND_WINDOW) -> list[bool]:
    """Per prompt position: inside a run of ``window`` tokens that also occurs in one of the warm-up
    prompts (the last position never: it is always computed). The most a lookup of cached runs at
    any offset could find, whatever was registered."""
    grams = {tuple(w[i : i + window]) for w in warm_ids for i in range(len(w) - window + 1)}
    mask = [False] * len(prompt_ids)
    for i in range(len(prompt_ids) - window + 1):
        if tuple(prompt_ids[i : i + window]) in grams:
            mask[i : i + window] = [True] * window
    if mask:
        mask[-1] = False
    return mask


def reusable_tokens(prompt_ids: Sequence[int], warm_ids: Sequence[Sequence[int]], window: int = FOUND_WINDOW) -> int:
    """How many prompt tokens :func:`reusable_mask` marks."""
    return sum(reusable_mask(prompt_ids, warm_ids, window))


def run_greedy(
    llm: LLM, prompt: list[Any], reuse: dict[str, Any], n_tokens: int, keep: int = 1
) -> tuple[torch.Tensor, RequestOutput]:
    """Greedy ``n_tokens`` of ``prompt``: (``[keep, V]`` log-probabilities of the first ``keep``
    generated tokens, the output)."""
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    req = llm.add_request(prompt, params, reuse=reuse, keep_first_logits=max(1, keep))
    out = llm.run_to_completion([req])[0]
    assert out.step_logprobs is not None
    return torch.from_numpy(out.step_logprobs), out


def forced_logprobs(llm: LLM, prompt: list[Any], reuse: dict[str, Any], forced: Sequence[int]) -> torch.Tensor:
    """``[len(forced), V]``: the next-token log-probabilities of ``prompt`` under ``reuse`` at each
    generated position when the generated tokens are ``forced`` (teacher forcing)."""
    params = SamplingParams(max_tokens=len(forced), temperature=0.0, ignore_eos=True,
                            forced_token_ids=list(forced))
    req = llm.add_request(prompt, params, reuse=reuse, keep_first_logits=len(forced))
    out = llm.run_to_completion([req])[0]
    assert out.step_logprobs is not None and out.token_ids == list(forced)
    return torch.from_numpy(out.step_logprobs)


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens of ``a`` and ``b`` are equal."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def evaluate_item(
    llm: LLM, item: WorkItem, methods: list[MethodSpec], namespace: str, continuation: int = 32,
    forced: int = FORCED, warm: dict[str, Any] | None = None,
) -> list[RunResult]:
    """Warm the cache with ``item.warmup`` (served with the reuse options ``warm``; default a full
    prefill, so every cached segment is exact in its own context), then run the reference and
    every method.

    Each method's next-token distributions at the first ``forced`` generated positions are
    compared with the reference's under teacher forcing (see the module docstring).
    """
    forced = max(1, min(forced, continuation))
    prompt = to_parts(llm, item.prompt)
    warm_ids = []
    for warm_prompt in item.warmup:
        parts = to_parts(llm, warm_prompt)
        warm_ids.append(llm.tokenizer.encode_prompt(parts)[0])
        run_greedy(llm, parts, {"method": "none", **(warm or {}), "namespace": namespace}, 1)
    reusable = reusable_tokens(llm.tokenizer.encode_prompt(prompt)[0], warm_ids)
    units = llm.tokenizer.encode if item.f1_units == "tokens" else str.split

    def scored(text: str) -> tuple[bool | None, float | None]:
        correct = None if item.answer is None else answer_found(item.answer, text)
        return correct, (answer_f1(text, item.answers, units) if item.answers else None)

    ref_lps, ref = run_greedy(llm, prompt, {"method": "none", "register": False, "namespace": namespace},
                              continuation, forced)
    correct, f1 = scored(ref.text)
    out = [RunResult(
        item=item.name, kind=item.kind, method="none", top1=True, kl=0.0, match_len=len(ref.token_ids),
        correct=correct, ttft_s=ref.metrics.ttft_s, compute_fraction=1.0, recomputed_fraction=1.0,
        segment_hit_fraction=0.0, prompt_tokens=ref.metrics.num_prompt_tokens, kl_forced=0.0,
        kl_steps=[0.0] * forced, f1=f1, found=0.0, ttft_ratio=1.0,
    )]
    for spec in methods:
        reuse = {**spec.reuse, "register": False, "namespace": namespace}
        lps, req = run_greedy(llm, prompt, reuse, continuation, forced)
        match = matching_prefix(req.token_ids, ref.token_ids)
        if match < forced - 1:  # its own tokens left the reference's path: feed the reference's back
            lps = forced_logprobs(llm, prompt, reuse, ref.token_ids[:forced])
        steps = step_kl(ref_lps, lps)
        m, n = req.metrics, req.metrics.num_prompt_tokens
        hit = m.num_segment_hit_tokens + m.num_prefix_hit_tokens
        correct, f1 = scored(req.text)
        out.append(RunResult(
            item=item.name, kind=item.kind, method=spec.label,
            top1=req.token_ids[0] == ref.token_ids[0], kl=steps[0], match_len=match, correct=correct,
            ttft_s=m.ttft_s, compute_fraction=m.compute_fraction,
            recomputed_fraction=m.num_recomputed_tokens / n, segment_hit_fraction=m.num_segment_hit_tokens / n,
            prompt_tokens=n, kl_forced=statistics.mean(steps), kl_steps=steps, f1=f1,
            found=min(1.0, hit / reusable) if reusable else None,
            ttft_ratio=m.ttft_s / ref.metrics.ttft_s if ref.metrics.ttft_s > 0 else None,
        ))
    return out


INTERVAL_METRICS = ("top1", "kl", "kl16", "gap_closed", "gap_closed16", "match32", "accuracy", "cost", "f1",
                    "found", "ttft_ratio")
"""Summary fields that get a bootstrap 95% interval (``row["ci"][field] = [lo, hi]``)."""


WORSE_TOLERANCE = 1e-6
"""KL above naive's by more than this counts an item as worse than naive (the exactness tests'
tolerance: two exact methods differ by less)."""


def summarize(results: list[RunResult], *, seed: int = 0, resamples: int = RESAMPLES) -> list[dict[str, Any]]:
    """Per (workload kind, method): means, accuracy, median TTFT, the share of naive's KL gap closed
    (first token and teacher-forced over ``FORCED`` positions), each with a seeded bootstrap 95%
    interval over the items (``row["ci"]``; the gap paired item by item with naive), and how many
    items the method did worse on than naive (``worse``: first-token KL, ``worse16``: KL@16)."""
    groups: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for r in results:
        groups[(r.kind, r.method)].append(r)
    naive = {k: {r.item: r for r in rs} for (k, m), rs in groups.items() if m == "naive"}
    rows = []
    for (kind, method), rs in groups.items():
        base = naive.get(kind, {})
        paired = [r for r in rs if r.item in base]
        series: dict[str, Any] = {
            "top1": mean_of([float(r.top1) for r in rs]), "kl": mean_of([r.kl for r in rs]),
            "kl16": mean_of([r.kl_forced for r in rs]), "match32": mean_of([float(r.match_len) for r in rs]),
            "cost": mean_of([r.compute_fraction for r in rs]),
        }
        sizes = dict.fromkeys(series, len(rs))
        answered = [float(r.correct) for r in rs if r.correct is not None]
        if answered:
            series["accuracy"], sizes["accuracy"] = mean_of(answered), len(answered)
        for name, values in (("f1", [r.f1 for r in rs]), ("found", [r.found for r in rs])):
            known = [v for v in values if v is not None]
            if known:
                series[name], sizes[name] = mean_of(known), len(known)
        ratios = [r.ttft_ratio for r in rs if r.ttft_ratio is not None]
        if ratios:
            series["ttft_ratio"], sizes["ttft_ratio"] = median_of(ratios), len(ratios)
        if paired:
            for name, attr in (("gap_closed", "kl"), ("gap_closed16", "kl_forced")):
                series[name] = gap_closed_of([getattr(r, attr) for r in paired],
                                             [getattr(base[r.item], attr) for r in paired])
                sizes[name] = len(paired)
        point = {name: stat(range(sizes[name])) for name, stat in series.items()}
        ci = {name: bootstrap_interval(sizes[name], stat, seed=f"{seed}:{kind}:{method}:{name}",
                                       resamples=resamples) for name, stat in series.items()}
        rows.append({
            "kind": kind, "method": method, "n": len(rs),
            "top1": point["top1"], "kl": point["kl"], "kl16": point["kl16"],
            "gap_closed": point.get("gap_closed"), "gap_closed16": point.get("gap_closed16"),
            "match32": point["match32"], "accuracy": point.get("accuracy"), "f1": point.get("f1"),
            "found": point.get("found"), "ttft_ratio": point.get("ttft_ratio"),
            "ttft_s": statistics.median(r.ttft_s for r in rs),
            "cost": point["cost"],
            "recomputed": statistics.mean(r.recomputed_fraction for r in rs),
            "reused": statistics.mean(r.segment_hit_fraction for r in rs),
            "worse": sum(r.kl > base[r.item].kl + WORSE_TOLERANCE for r in paired) if paired else None,
            "worse16": (sum(r.kl_forced > base[r.item].kl_forced + WORSE_TOLERANCE for r in paired)
                        if paired else None),
            "tokens": statistics.mean(r.prompt_tokens for r in rs),
            "ci": {name: None if v is None else [v[0], v[1]] for name, v in ci.items()},
        })
    return rows


def as_dicts(results: list[RunResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
