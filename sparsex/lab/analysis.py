"""Analysis-only measurements over the engine's parts (the lab; never imported by the engine).

``layer_kv_effect``: which layers' KV errors matter for the first token. ``late_start_effect``: would
a cache of per-token hidden states make repair cheaper. Both cost a full prefill per item.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sparsex.cache import blocks_for_tokens
from sparsex.kv.admission import auto_spans
from sparsex.lab.quality import kl_divergence, run_greedy, to_parts
from sparsex.lab.workloads import WorkItem
from sparsex.models.base import SeqSlice, StepContext
from sparsex.runtime.model_runner import SeqInput
from sparsex.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sparsex.llm import LLM


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
    for warm in item.warmup:
        run_greedy(llm, to_parts(llm, warm), {"method": "none", "namespace": namespace}, 1)
    prompt = to_parts(llm, item.prompt)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    kv, out = llm.engine.kv, {}
    captured = []
    for method in ("none", "naive"):
        req = llm.add_request(prompt, params, reuse={"method": method, "register": False, "namespace": namespace})
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
            return torch.log_softmax(llm.engine.runner.forward([last])[0].float(), dim=-1)

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
    model, kv, num_layers, bs = llm.engine.runner.model, llm.engine.kv, llm.spec.num_layers, llm.engine.pool.block_size
    if any(not 0 <= m < num_layers for m in starts):
        raise ValueError(f"start layers must be in [0, {num_layers})")
    warm_states = [_layer_inputs(llm, to_parts(llm, warm), starts, namespace) for warm in item.warmup]
    prompt = to_parts(llm, item.prompt)
    ref, _ = run_greedy(llm, prompt, {"method": "none", "register": False, "namespace": namespace}, 1)

    out: dict[str, tuple[float, float]] = {}
    for method in ("naive", "blend"):  # blend without the segment shift: these runs do not apply it
        lp, res = run_greedy(llm, prompt, {"method": method, "shift": 0.0, "register": False, "namespace": namespace}, 1)
        out[method] = (kl_divergence(ref, lp), res.metrics.compute_fraction)
    assert res.recomputed_positions is not None
    chosen = torch.from_numpy(res.recomputed_positions)  # blend's, the last run
    ids, explicit = llm.tokenizer.encode_prompt(prompt)
    n = len(ids)
    spans = list(explicit) + auto_spans(n, ids, list(explicit), namespace)
    _, _, hits = llm.engine.cache.lookup(ids, spans, namespace, prefix=False, segments=True)
    cached = {m: torch.zeros(n, llm.spec.hidden_size) for m in starts}  # each reused token's recorded input
    for h in hits:
        k = h.first_offset + torch.arange(h.num_tokens)  # entry slots of the run (any offset)
        orig = torch.tensor(h.src_positions)[k // bs] + k % bs
        toks, o = ids[h.span.start : h.span.start + h.num_tokens], int(orig[0])
        # The first warm-up holding the segment at that position computed (and registered) it.
        src = next(states for w_ids, states in warm_states if w_ids[o : o + len(toks)] == toks)
        for m in starts:
            cached[m][h.span.start : h.span.start + h.num_tokens] = src[m][orig]
    table = llm.engine.pool.allocate(blocks_for_tokens(n, bs))
    try:
        reused = torch.zeros(n, dtype=torch.bool)
        reused[llm.engine.store.load(hits, table)[0]] = True
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
        llm.engine.pool.release(table)
    return out


def _layer_inputs(
    llm: LLM, prompt: list[Any], layers: list[int], namespace: str
) -> tuple[list[int], dict[int, torch.Tensor]]:
    """Run ``prompt`` with ``none`` (so its segments are cached as usual); its token ids and every
    prompt token's input to each of ``layers``, from the same full prefill in scratch blocks."""
    req = llm.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                          reuse={"method": "none", "namespace": namespace})
    llm.run_to_completion([req])
    ids, n = req.prompt_token_ids, len(req.prompt_token_ids)
    table = llm.engine.pool.allocate(blocks_for_tokens(n, llm.engine.pool.block_size))
    try:
        states = llm.engine.runner.layer_inputs(SeqInput(ids, list(range(n)), table, n), layers)
    finally:
        llm.engine.pool.release(table)
    return ids, states
