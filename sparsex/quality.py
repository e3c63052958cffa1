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

from sparsex.sampling_params import SamplingParams
from sparsex.workloads import WorkItem

if TYPE_CHECKING:
    from sparsex.engine import LLM


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


def _run(llm: LLM, prompt: list[Any], reuse: dict[str, Any], n_tokens: int) -> tuple[torch.Tensor, Any]:
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    req = llm.add_request(prompt, params, reuse=reuse)
    req.keep_first_logits = True
    while not req.finished:
        llm.step()
    return torch.log_softmax(req.first_logits, dim=-1), req


def evaluate_item(
    llm: LLM, item: WorkItem, methods: list[MethodSpec], namespace: str, continuation: int = 32
) -> list[RunResult]:
    """Warm the cache with ``item.warmup``, then run the reference and every method."""
    for warm in item.warmup:
        _run(llm, warm, {"method": "none", "namespace": namespace}, 1)
    ref_lp, ref = _run(llm, item.prompt, {"method": "none", "register": False, "namespace": namespace},
                       continuation)
    out = [RunResult(
        item=item.name, kind=item.kind, method="none", top1=True, kl=0.0, match_len=len(ref.output_token_ids),
        correct=None if item.answer is None else item.answer.lower() in ref.text.lower(),
        ttft_s=ref.metrics.ttft_s, compute_fraction=1.0, recomputed_fraction=1.0, segment_hit_fraction=0.0,
        prompt_tokens=ref.metrics.num_prompt_tokens,
    )]
    for spec in methods:
        reuse = {**spec.reuse, "register": False, "namespace": namespace}
        lp, req = _run(llm, item.prompt, reuse, continuation)
        kl = kl_divergence(ref_lp, lp)
        match = 0
        for a, b in zip(req.output_token_ids, ref.output_token_ids, strict=False):
            if a != b:
                break
            match += 1
        m, n = req.metrics, req.metrics.num_prompt_tokens
        out.append(RunResult(
            item=item.name, kind=item.kind, method=spec.label,
            top1=req.output_token_ids[0] == ref.output_token_ids[0], kl=kl, match_len=match,
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


def layer_kv_effect(
    llm: LLM, item: WorkItem, layer_sets: dict[str, list[int]], namespace: str
) -> dict[str, float]:
    """Which layers' KV errors matter for the first token: KL against full prefill per ``layer_sets``.

    Runs the item's warm-up, then the prompt with ``none`` (the true KV of every position) and with
    ``naive`` (cached KV at reused positions). For each named set of layers, the naive KV is given
    the true KV in those layers only and the last prompt token is run again over it; the result is
    KL(full prefill || that mix). An empty set gives naive's KL (up to the last token's own KV);
    every layer gives 0. Analysis only: it costs a full prefill per item.
    """
    from sparsex.model_runner import SeqInput

    for warm in item.warmup:
        _run(llm, warm, {"method": "none", "namespace": namespace}, 1)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    kv, out = llm.kv, {}
    captured = []
    for method in ("none", "naive"):
        req = llm.add_request(item.prompt, params, reuse={"method": method, "register": False, "namespace": namespace})
        llm.step()  # the prefill: the request now holds the prompt's KV
        n = req.metrics.num_prompt_tokens
        slots = kv.slots(req.block_table, torch.arange(n, device=kv.k.device))
        captured.append((kv.k[:, slots].clone(), kv.v[:, slots].clone()))
        if method == "none":
            llm.abort(req)
    (k_true, v_true), (k_naive, v_naive) = captured
    last = SeqInput([req.prompt_token_ids[-1]], [n - 1], req.block_table, n)
    try:
        def last_logprobs(layers: list[int]) -> torch.Tensor:
            k, v = k_naive.clone(), v_naive.clone()
            if layers:
                k[layers], v[layers] = k_true[layers], v_true[layers]
            kv.k[:, slots], kv.v[:, slots] = k, v
            return torch.log_softmax(llm.runner.forward([last])[0].float(), dim=-1)

        ref = last_logprobs(list(range(llm.spec.num_layers)))
        for name, layers in layer_sets.items():
            lp = last_logprobs(layers)
            out[name] = kl_divergence(ref, lp)
    finally:
        llm.abort(req)
    return out


def late_start_effect(
    llm: LLM, item: WorkItem, starts: list[int], namespace: str
) -> dict[str, tuple[float, float]]:
    """Would a cache of per-token hidden states make repair cheaper? KL against full prefill and cost.

    Runs the item's warm-up with ``none``, recording every token's input to each layer in ``starts``
    (what such a cache would hold), then ``naive`` and ``blend`` (``shift=0``). Then, over naive's KV, the
    non-reused tokens run every layer while a recompute set joins only at layer ``m``, from the
    hidden state recorded when its segment was cached, instead of running from layer 0:
    ``blend_R@m`` uses the set ``blend`` chose (``blend_R@0`` is that set with no selection cost),
    ``all@m`` every reused token. Returns ``name -> (kl, cost)``, cost as the fraction of a full
    prefill's token-layers. Analysis only: it costs a full prefill per item.
    """
    from sparsex.models.base import SeqSlice, StepContext
    from sparsex.reuse.store import auto_spans

    model, kv, num_layers, bs = llm.runner.model, llm.kv, llm.spec.num_layers, llm.pool.block_size
    if any(not 0 <= m < num_layers for m in starts):
        raise ValueError(f"start layers must be in [0, {num_layers})")
    warm_states = [_layer_inputs(llm, warm, starts, namespace) for warm in item.warmup]
    ref, _ = _run(llm, item.prompt, {"method": "none", "register": False, "namespace": namespace}, 1)

    out: dict[str, tuple[float, float]] = {}
    for method in ("naive", "blend"):  # blend without the segment shift: these runs do not apply it
        lp, req = _run(llm, item.prompt, {"method": method, "shift": 0.0, "register": False, "namespace": namespace}, 1)
        out[method] = (kl_divergence(ref, lp), req.metrics.compute_fraction)
    chosen = req.recomputed_positions  # blend's, the last run
    ids, n = req.prompt_token_ids, len(req.prompt_token_ids)
    spans = list(req.spans) + auto_spans(n, ids, list(req.spans), namespace)
    found = llm.store.lookup(ids, spans, namespace, prefix=False, segments=True)
    cached = {m: torch.zeros(n, llm.spec.hidden_size) for m in starts}  # each reused token's recorded input
    for h in found.hits:
        j = torch.arange(h.num_tokens)
        orig = torch.tensor(h.src_positions)[j // bs] + j % bs
        toks, o = ids[h.span.start : h.span.start + h.num_tokens], int(orig[0])
        # The first warm-up holding the segment at that position computed (and registered) it.
        src = next(states for w_ids, states in warm_states if w_ids[o : o + len(toks)] == toks)
        for m in starts:
            cached[m][h.span.start : h.span.start + h.num_tokens] = src[m][orig]
    table = llm.pool.allocate(-(-n // bs))
    try:
        reused = torch.zeros(n, dtype=torch.bool)
        reused[llm.store.load(found, table)] = True
        dev = kv.k.device
        slots, read = kv.slots(table, torch.arange(n, device=dev)), kv.reader(table, n, dev)
        k_naive, v_naive = kv.k[:, slots].clone(), kv.v[:, slots].clone()
        fresh, tokens = (~reused).nonzero().flatten(), torch.tensor(ids)

        def run(late: torch.Tensor, m: int) -> tuple[float, float]:
            kv.k[:, slots], kv.v[:, slots] = k_naive, v_naive
            active, x = fresh, model.embed(tokens[fresh].to(dev))
            for i in range(num_layers):
                if i == m:
                    order = torch.cat([active, late]).sort()
                    x = torch.cat([x, cached[m][late].to(x)])[order.indices]
                    active = order.values
                sl = SeqSlice(0, active.numel(), active.to(dev), kv.slots(table, active.to(dev)), read, n)
                x = model.layer_forward(i, x, StepContext(seqs=[sl], positions=sl.positions, kv=kv))
            lp = torch.log_softmax(model.compute_logits(x[-1:]).float()[0].cpu(), dim=-1)
            return kl_divergence(ref, lp), (fresh.numel() * num_layers + late.numel() * (num_layers - m)) / (n * num_layers)

        with torch.inference_mode():
            blend_r = chosen[reused[chosen]]
            for m in starts:
                out[f"blend_R@{m}"] = run(blend_r, m)
                out[f"all@{m}"] = run(reused.nonzero().flatten(), m)
    finally:
        llm.pool.release(table)
    return out


def _layer_inputs(
    llm: LLM, prompt: list[Any], layers: list[int], namespace: str
) -> tuple[list[int], dict[int, torch.Tensor]]:
    """Run ``prompt`` with ``none``; its token ids and every prompt token's input to each of ``layers``."""
    model = llm.runner.model
    req = llm.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                          reuse={"method": "none", "namespace": namespace})
    n = len(req.prompt_token_ids)
    states = {m: torch.zeros(n, llm.spec.hidden_size) for m in layers}
    forward = model.layer_forward

    def recording(i: int, x: torch.Tensor, step: Any) -> torch.Tensor:
        if i in states:
            prompt_rows = step.positions < n  # prefill rows only
            states[i][step.positions[prompt_rows].cpu()] = x[prompt_rows].float().cpu()
        return forward(i, x, step)

    setattr(model, "layer_forward", recording)  # noqa: B010 - an instance hook, removed below
    try:
        while not req.finished:
            llm.step()
    finally:
        delattr(model, "layer_forward")
    return req.prompt_token_ids, states
