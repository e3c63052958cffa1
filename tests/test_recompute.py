"""Planned sparse prefill: with R = every token, or ℓ* = last layer, every method equals `none`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsex import LLM, SamplingParams, Segment
from sparsex.lab.oracle import LAB_PLANNERS

DOCS = [
    "Alpha beta gamma delta. " * 8,
    "The interpreter reads a line, evaluates it and prints the result. " * 4,
    "Numbers follow: " + " ".join(str(i) for i in range(40)),
]


def reordered_prompt() -> list:
    return ["Intro.", Segment(DOCS[2]), Segment(DOCS[0]), "between", Segment(DOCS[1]), "Question: what?"]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def warm_llm(request: pytest.FixtureRequest, tiny_model_dir) -> LLM:
    llm = LLM(model=str(tiny_model_dir(request.param)), kv_cache_memory=32 << 20, planners=LAB_PLANNERS)
    for d in DOCS:  # cache every document in another context and position
        llm.next_token_logprobs(["A different lead-in text", Segment(d), "end"], reuse="none")
    return llm


def logprobs(llm: LLM, method: str, **opts: object) -> tuple[np.ndarray, dict]:
    reuse = {"method": method, "register": False, **opts}
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    req = llm.add_request(reordered_prompt(), params, reuse=reuse, keep_first_logits=True)
    out = llm.run_to_completion([req])[0]
    assert out.first_logprobs is not None
    m = out.metrics
    return out.first_logprobs, {"hits": m.num_segment_hit_tokens, "recomputed": m.num_recomputed_tokens,
                                "n": m.num_prompt_tokens}


@pytest.mark.parametrize(
    "method,opts",
    [
        ("sparsex", {"budget": 1.0}),
        ("sparsex", {"budget": 1.0, "hybrid": False}),
        ("cacheblend", {"budget": 1.0}),
        ("cacheblend", {"budget": 1.0, "filter_layers": 5, "filter_start": 3.0}),
        ("cacheblend-simple", {"budget": 1.0}),
        ("blend", {"budget": 1.0}),
        ("blend", {"budget": 1.0, "narrow_layer": 0}),
        ("blend", {"budget": 1.0, "shift": 1.0}),
        ("epic", {"epic_tokens": 10_000}),
        ("oracle", {"budget": 1.0}),
        ("oracle-blend", {"budget": 1.0}),
    ],
)
def test_recompute_everything_reproduces_none(warm_llm: LLM, method: str, opts: dict) -> None:
    ref, _ = logprobs(warm_llm, "none")
    got, m = logprobs(warm_llm, method, **opts)
    assert m["hits"] > 0, "the documents must have been reused"
    assert m["recomputed"] == m["n"]
    assert np.abs(got - ref).max() <= 1e-4


def test_boundary_at_last_layer_equals_none(warm_llm: LLM) -> None:
    ref, _ = logprobs(warm_llm, "none")
    last = warm_llm.spec.num_layers - 1
    got, m = logprobs(warm_llm, "sparsex", boundary=last, budget=0.0)
    assert m["hits"] > 0
    assert np.abs(got - ref).max() <= 1e-4


def test_naive_is_an_approximation_and_recomputes_only_new_tokens(warm_llm: LLM) -> None:
    ref, _ = logprobs(warm_llm, "none")
    got, m = logprobs(warm_llm, "naive")
    kl = float(np.sum(np.exp(ref) * (ref - got)))
    assert kl > 1e-7
    assert m["recomputed"] == m["n"] - m["hits"]


def test_budget_controls_the_recompute_set(warm_llm: LLM) -> None:
    sizes = [logprobs(warm_llm, "cacheblend", budget=b)[1]["recomputed"] for b in (0.0, 0.25, 0.5)]
    assert sizes[0] < sizes[1] < sizes[2]


def recomputed_positions(llm: LLM, method: str, **opts: object) -> tuple[np.ndarray, float]:
    """The final recompute set and the cost of a one-token request."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    req = llm.add_request(reordered_prompt(), params, reuse={"method": method, "register": False, **opts},
                          keep_first_logits=True)
    out = llm.run_to_completion([req])[0]
    assert out.recomputed_positions is not None
    return out.recomputed_positions, out.metrics.compute_fraction


def test_cacheblend_filters_gradually_down_to_the_budget(warm_llm: LLM) -> None:
    """Published CacheBlend: the check layer keeps 1.5x the budget by K deviation, the next layers
    narrow that set to the budget. Its first set is the simplified variant's at 1.5x the budget (the
    same layer, the same scores), so the final set lies inside it; the extra layers cost more."""
    simple_lp, _ = logprobs(warm_llm, "cacheblend-simple", budget=0.2)
    one_step, _ = logprobs(warm_llm, "cacheblend", budget=0.2, filter_layers=0)
    assert np.array_equal(simple_lp, one_step)  # no stage: the simplified variant exactly
    final, cost = recomputed_positions(warm_llm, "cacheblend", budget=0.2, filter_layers=2, filter_start=1.5)
    simple, simple_cost = recomputed_positions(warm_llm, "cacheblend-simple", budget=0.2)
    wide, wide_cost = recomputed_positions(warm_llm, "cacheblend-simple", budget=0.3)
    assert len(final) == len(simple) < len(wide)
    if warm_llm.spec.num_layers - 3 < 1:  # check layer 1, and the final set must run a layer: no stage
        assert np.array_equal(final, simple) and cost == simple_cost
        return
    assert set(final.tolist()) <= set(wide.tolist())
    assert simple_cost < cost < wide_cost


def test_oracle_blend_runs_the_default_pipeline_around_the_true_top_k(warm_llm: LLM) -> None:
    """oracle-blend = layer 0 dense + (I_nr, true top-k, overflow, tail) + shift; at budget 0 it
    recomputes blend's extras only, so more than the selection-only oracle, and costs one dense layer."""
    oracle, oracle_cost = recomputed_positions(warm_llm, "oracle", budget=0.0)
    full, full_cost = recomputed_positions(warm_llm, "oracle-blend", budget=0.0)
    assert set(oracle.tolist()) < set(full.tolist())
    assert full_cost > oracle_cost + 1 / warm_llm.spec.num_layers - 1e-9
    no_shift, _ = logprobs(warm_llm, "oracle-blend", budget=0.1, shift=0.0)
    shifted, _ = logprobs(warm_llm, "oracle-blend", budget=0.1, shift=0.5)
    assert not np.array_equal(no_shift, shifted)


def test_oracle_restores_the_loaded_kv_and_ranks_by_true_error(warm_llm: LLM) -> None:
    """With budget 0 the oracle must equal naive exactly: its measuring prefill left no trace."""
    naive, m_naive = logprobs(warm_llm, "naive")
    oracle, m_oracle = logprobs(warm_llm, "oracle", budget=0.0)
    assert m_oracle["recomputed"] == m_naive["recomputed"]
    assert np.abs(oracle - naive).max() <= 1e-6
    # A small budget spent on the largest true errors beats naive.
    ref, _ = logprobs(warm_llm, "none")
    better, _ = logprobs(warm_llm, "oracle", budget=0.3)
    kl = [float(np.sum(np.exp(ref) * (ref - x))) for x in (naive, better)]
    assert kl[1] < kl[0]


def layer_kv_after(
    llm: LLM, monkeypatch: pytest.MonkeyPatch, method: str, layer: int, **opts: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s K and V of every prompt position right after a one-token request."""
    released: list[list[int]] = []
    release = llm.engine.pool.release
    monkeypatch.setattr(llm.engine.pool, "release", lambda ids: (released.append(list(ids)), release(ids))[1])
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    req = llm.add_request(reordered_prompt(), params, reuse={"method": method, "register": False, **opts})
    while not req.finished:
        llm.step()
    monkeypatch.undo()
    n = req.metrics.num_prompt_tokens
    slots = llm.engine.kv.slots(released[-1], torch.arange(n))  # the request's blocks: freed, nothing ran since
    return llm.engine.kv.k[layer][slots].clone(), llm.engine.kv.v[layer][slots].clone()


def test_blend_restores_unselected_tokens_in_its_dense_layers(warm_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above layer 0 the dense pass writes fresh KV for every token; unselected reused tokens get
    their loaded KV back, so each keeps one consistent (stale) KV across layers."""
    k_naive, v_naive = layer_kv_after(warm_llm, monkeypatch, "naive", 1)
    k_blend, v_blend = layer_kv_after(warm_llm, monkeypatch, "blend", 1, check_layer=2, budget=0.0,
                                      overflow_blocks=0, tail_tokens=0)
    _, m = logprobs(warm_llm, "naive")
    changed = (k_blend - k_naive).abs().amax(dim=(1, 2)) > 0
    # Only non-reused tokens can differ from naive (those before the first segment do not).
    assert 0 < int(changed.sum()) <= m["recomputed"]
    assert torch.equal(v_blend[~changed], v_naive[~changed])
    # CacheBlend keeps its dense layer-1 KV for every token: most reused tokens differ.
    k_cb, _ = layer_kv_after(warm_llm, monkeypatch, "cacheblend", 1, check_layer=1, budget=0.0)
    assert int(((k_cb - k_naive).abs().amax(dim=(1, 2)) > 0).sum()) > m["recomputed"] + m["hits"] // 2


def test_blend_narrowing_keeps_the_budget_and_restores_dropped_candidates(
    warm_llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two stages: 3x the budget runs layers 1..2, the top budget by layer-2 deviation goes on. The
    dropped candidates ran layers 1..2 with fresh KV; it is put back, so at those layers only the
    final set differs from naive."""
    narrowed = {"budget": 0.1, "narrow_layer": 2, "candidates": 3.0, "overflow_blocks": 0, "tail_tokens": 0}
    _, m_final = logprobs(warm_llm, "blend", **narrowed)
    _, m_wide = logprobs(warm_llm, "blend", budget=0.3, overflow_blocks=0, tail_tokens=0)  # the first stage alone
    _, m_budget = logprobs(warm_llm, "blend", budget=0.1, overflow_blocks=0, tail_tokens=0)
    assert m_final["recomputed"] == m_budget["recomputed"] < m_wide["recomputed"]
    for layer in (1, 2):
        k_naive, v_naive = layer_kv_after(warm_llm, monkeypatch, "naive", layer)
        k_nar, v_nar = layer_kv_after(warm_llm, monkeypatch, "blend", layer, **narrowed)
        changed = ((k_nar - k_naive).abs().amax(dim=(1, 2)) > 0) | ((v_nar - v_naive).abs().amax(dim=(1, 2)) > 0)
        assert 0 < int(changed.sum()) <= m_final["recomputed"], layer
    # Without the restore the dropped candidates keep their fresh KV: more tokens differ.
    # (layer_kv_after undoes every patch once its request has run, so the naive run below is normal.)
    monkeypatch.setattr("sparsex.runtime.executor._restore", lambda *a: None)
    k_kept, _ = layer_kv_after(warm_llm, monkeypatch, "blend", 2, **narrowed)
    k_naive, _ = layer_kv_after(warm_llm, monkeypatch, "naive", 2)
    assert int(((k_kept - k_naive).abs().amax(dim=(1, 2)) > 0).sum()) > m_final["recomputed"]


def test_segment_shift_moves_only_the_idle_reused_tokens_of_this_request(
    warm_llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the first layer after the final selection, the reused tokens that do not run get their
    segment's mean correction (shift > 0) or keep the loaded KV (shift = 0); tokens that run get
    fresh KV either way; the cached segments themselves never change."""
    before, _ = logprobs(warm_llm, "naive")
    opts = {"budget": 0.2, "narrow_layer": 0, "overflow_blocks": 0, "tail_tokens": 0}  # final set from layer 1: shift from 1
    _, m = logprobs(warm_llm, "blend", shift=0.0, **opts)
    layer = warm_llm.spec.num_layers - 1
    k_naive, v_naive = layer_kv_after(warm_llm, monkeypatch, "naive", layer)
    k_off, v_off = layer_kv_after(warm_llm, monkeypatch, "blend", layer, shift=0.0, **opts)
    k_on, v_on = layer_kv_after(warm_llm, monkeypatch, "blend", layer, shift=0.5, **opts)

    def differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().amax(dim=(1, 2)) > 0

    ran = differs(k_off, k_naive) | differs(v_off, v_naive)  # recomputed positions (no shift)
    assert 0 < int(ran.sum()) <= m["recomputed"]
    shifted = (differs(k_on, k_naive) | differs(v_on, v_naive)) & ~ran
    assert int(shifted.sum()) >= m["hits"] // 2  # most idle reused tokens moved
    assert int(shifted.sum()) <= m["hits"]  # only reused tokens: the others ran or were never loaded
    after, _ = logprobs(warm_llm, "naive")
    assert np.array_equal(before, after)  # the shift wrote into the request's own copy only


def test_shift_sources_selected_leaves_out_the_overflow_and_tail(warm_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """At budget 0 only the overflow blocks and the tail run: with ``shift_sources="all"`` their
    means move the idle reused tokens; with ``"selected"`` no segment has a source, so the KV is
    exactly that of ``shift=0``."""
    opts = {"budget": 0.0, "narrow_layer": 0}
    layer = warm_llm.spec.num_layers - 1
    k_off, v_off = layer_kv_after(warm_llm, monkeypatch, "blend", layer, shift=0.0, **opts)
    k_all, _ = layer_kv_after(warm_llm, monkeypatch, "blend", layer, shift=0.5, **opts)
    k_sel, v_sel = layer_kv_after(warm_llm, monkeypatch, "blend", layer, shift=0.5, shift_sources="selected", **opts)
    assert not torch.equal(k_all, k_off)
    assert torch.equal(k_sel, k_off) and torch.equal(v_sel, v_off)


def test_narrowing_stages_are_validated_and_costed() -> None:
    """Stages sit at increasing layers after the selection; each larger set's extra layers count."""
    from sparsex.runtime.executor import NarrowStage, PlanRun, RecomputePlan, compute_fraction
    from sparsex.runtime.model_runner import SeqInput

    seq = SeqInput(list(range(100)), list(range(100)), [0], 100)
    keep = lambda inp: inp.positions  # noqa: E731
    with pytest.raises(ValueError):
        RecomputePlan(seq, 2, torch.arange(10), stages=(NarrowStage(3, keep), NarrowStage(3, keep)))
    with pytest.raises(ValueError):
        RecomputePlan(seq, 2, torch.arange(10), stages=(NarrowStage(1, keep),))
    with pytest.raises(ValueError):
        RecomputePlan(seq, 0, torch.arange(10), stages=(NarrowStage(2, keep),))
    plan = RecomputePlan(seq, 2, torch.arange(40), stages=(NarrowStage(2, keep), NarrowStage(4, keep)))
    run = PlanRun(torch.zeros(1), torch.arange(10), stage_sizes=(40, 20))
    # layers 0-1 all 100 tokens; layer 2: 40; layers 3-4: 20; layers 5-9: 10
    assert compute_fraction(plan, run, 10, 100) == pytest.approx((2 * 100 + 40 + 2 * 20 + 5 * 10) / 1000)


@pytest.mark.parametrize("method", ["blend", "sparsex"])
def test_sink_tokens_recompute_what_was_cached_at_a_prompt_start(tiny_model_dir, method: str) -> None:
    """Two documents each served alone (their first tokens cached at positions 0..): pasted one
    after the other, the second one's first tokens are attention sinks of the cache; sink_tokens
    recomputes them, even at budget 0 and with no new text next to them (no overflow)."""
    llm = LLM(model=str(tiny_model_dir("llama")), kv_cache_memory=32 << 20)
    first, second = (llm.tokenizer.encode(d) for d in DOCS[:2])
    for doc in (first, second):
        llm.generate([doc], SamplingParams(max_tokens=1), reuse="none")
    prompt = [first, second, llm.tokenizer.encode(" Question: what?")]
    start = len(llm.tokenizer.with_bos([])) + len(first)  # where the second document lands

    def recomputed(sinks: int) -> set[int]:
        req = llm.add_request(prompt, SamplingParams(max_tokens=1), keep_first_logits=True,
                              reuse={"method": method, "budget": 0.0, "sink_tokens": sinks, "register": False})
        out = llm.run_to_completion([req])[0]
        assert out.metrics.num_segment_hit_tokens >= len(second) - 16
        return {int(p) for p in out.recomputed_positions}

    assert not {start, start + 1, start + 2} & recomputed(0)
    assert {start, start + 1, start + 2} <= recomputed(3)
    assert start + 3 not in recomputed(3)
