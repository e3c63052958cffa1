"""Teacher-forced fidelity beyond the first token: exact at a full budget, sensitive to the forced
tokens, and the harness's shortcut (a free run that stayed on the reference's path) is exact."""

from __future__ import annotations

import pytest

from sparsex import LLM, SamplingParams
from sparsex.lab.oracle import LAB_PLANNERS
from sparsex.lab.quality import (
    evaluate_item,
    forced_logprobs,
    parse_method,
    run_greedy,
    step_kl,
    summarize,
)
from sparsex.lab.workloads import WorkItem, make_workload

FORCED = 16


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(model=str(tiny_model_dir("llama")), kv_cache_memory=32 << 20, planners=LAB_PLANNERS)


@pytest.fixture(scope="module")
def item() -> WorkItem:
    return make_workload("rag", 1, seed=3, doc_tokens=40, num_docs=4, style="chatml")[0]


def _warm(llm: LLM, item: WorkItem, ns: str) -> None:
    for warm in item.warmup:
        run_greedy(llm, warm, {"method": "none", "namespace": ns}, 1)


def test_forced_tokens_are_generated_and_logprobs_kept(llm: LLM, item: WorkItem) -> None:
    forced = [5, 9, 5, 7]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, forced_token_ids=forced)
    req = llm.add_request(item.prompt, params, reuse="none", keep_first_logits=3)
    out = llm.run_to_completion([req])[0]
    assert out.token_ids[:4] == forced and len(out.token_ids) == 6  # then greedy again
    assert out.step_logprobs is not None and out.step_logprobs.shape == (3, llm.spec.vocab_size)
    assert out.first_logprobs is not None and (out.step_logprobs[0] == out.first_logprobs).all()
    assert out.logprobs[1] == pytest.approx(float(out.step_logprobs[1][9]))
    with pytest.raises(ValueError):
        SamplingParams(forced_token_ids=[-1])


@pytest.mark.parametrize("method", ["blend", "cacheblend", "sparsex", "oracle-blend"])
def test_teacher_forcing_at_full_budget_reproduces_none(llm: LLM, item: WorkItem, method: str) -> None:
    ns = f"tf-{method}"
    _warm(llm, item, ns)
    ref_lps, ref = run_greedy(llm, item.prompt, {"method": "none", "register": False, "namespace": ns},
                              FORCED + 1, FORCED)
    reuse = {"method": method, "budget": 1.0, "register": False, "namespace": ns}
    got = forced_logprobs(llm, item.prompt, reuse, ref.token_ids[:FORCED])
    kls = step_kl(ref_lps, got)
    assert len(kls) == FORCED and max(kls) <= 1e-6
    # The same check with the reference's tokens off by one fails: it really compares contexts.
    shifted = ref.token_ids[1 : FORCED + 1]
    assert shifted != ref.token_ids[:FORCED]
    off = step_kl(ref_lps, forced_logprobs(llm, item.prompt, reuse, shifted))
    assert off[0] <= 1e-6  # position 0 sees the prompt only
    assert max(off) > 1e-6


def test_harness_forced_kl_equals_a_direct_forced_run(llm: LLM, item: WorkItem) -> None:
    """Whether the harness used the method's free run (still on the reference's path) or fed the
    reference's tokens back, its per-position KL is that of a teacher-forced run."""
    ns = "tf-harness"
    methods = [parse_method(m) for m in ("naive", "blend:budget=1.0", "epic")]
    results = evaluate_item(llm, item, methods, namespace=ns, continuation=FORCED, forced=FORCED)
    by = {r.method: r for r in results}
    assert max(by["blend:budget=1.0"].kl_steps) <= 1e-6 and by["blend:budget=1.0"].match_len == FORCED
    assert by["naive"].kl_forced > 1e-6 and by["naive"].kl_steps[0] == by["naive"].kl
    ref_lps, ref = run_greedy(llm, item.prompt, {"method": "none", "register": False, "namespace": ns},
                              FORCED, FORCED)
    for label in ("naive", "epic"):
        reuse = {**methods[[m.label for m in methods].index(label)].reuse, "register": False, "namespace": ns}
        direct = step_kl(ref_lps, forced_logprobs(llm, item.prompt, reuse, ref.token_ids))
        assert by[label].kl_steps == pytest.approx(direct, abs=1e-7)
    rows = {r["method"]: r for r in summarize(results)}
    assert rows["naive"]["gap_closed16"] == 0.0
    assert rows["blend:budget=1.0"]["gap_closed16"] == pytest.approx(1.0, abs=1e-4)
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks
