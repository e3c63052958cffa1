"""The quality harness on a tiny model: the reference scores perfectly, naive does not, and the
per-layer analysis brackets naive and full prefill."""

from __future__ import annotations

import pytest

from sparsex import LLM
from sparsex.lab.analysis import late_start_effect, layer_kv_effect
from sparsex.lab.bench.layers import layer_sets
from sparsex.lab.oracle import LAB_PLANNERS
from sparsex.lab.quality import evaluate_item, parse_method, summarize
from sparsex.lab.workloads import WorkItem, make_workload


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(model=str(tiny_model_dir("llama")), kv_cache_memory=32 << 20, planners=LAB_PLANNERS,
               max_prefill_tokens=None)


def test_parse_method_reads_typed_options() -> None:
    spec = parse_method("sparsex:narrow_layer=0,candidates=2.5,hybrid=false,epic_tokens=8", budget=0.3)
    assert spec.reuse == {"method": "sparsex", "budget": 0.3, "narrow_layer": 0, "candidates": 2.5,
                          "hybrid": False, "epic_tokens": 8}


def test_reference_scores_perfectly_and_naive_leaves_a_gap(llm: LLM) -> None:
    items = make_workload("rag", 2, seed=3, doc_tokens=40, num_docs=4, style="chatml")
    methods = [parse_method(m) for m in ("naive", "none", "blend:budget=1.0")]
    results = [r for i, item in enumerate(items)
               for r in evaluate_item(llm, item, methods, namespace=f"q{i}", continuation=4)]
    assert {r.method for r in results} == {"none", "naive", "blend:budget=1.0"}
    rows = {row["method"]: row for row in summarize(results)}
    assert rows["naive"]["kl"] > 1e-6 and rows["naive"]["gap_closed"] == 0.0
    assert all(r.segment_hit_fraction > 0.5 for r in results if r.method == "naive")
    for exact in ("none", "blend:budget=1.0"):  # a full recompute is the reference again
        assert rows[exact]["kl"] <= 1e-6 and rows[exact]["gap_closed"] == pytest.approx(1.0, abs=1e-4)
        assert rows[exact]["top1"] == 1.0 and rows[exact]["match32"] == 4


def test_layer_analysis_brackets_naive_and_full_prefill(llm: LLM) -> None:
    item = make_workload("agents", 1, seed=5, doc_tokens=40, style="chatml")[0]
    naive = [r for r in evaluate_item(llm, item, [parse_method("naive")], namespace="la", continuation=1)
             if r.method == "naive"][0]
    sets = layer_sets(llm.spec.num_layers, cuts=[1, 2], width=1)
    assert set(sets) == {"none", "all", "<1", ">=1", "<2", ">=2", "[0,1)", "[1,2)", "[2,3)"}
    kl = layer_kv_effect(llm, item, sets, namespace="la")
    assert kl["all"] <= 1e-7
    assert naive.kl > 1e-6
    assert kl["none"] == pytest.approx(naive.kl, rel=1e-3)  # the mix with no true layer is naive
    assert kl[">=1"] < kl["none"]
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks  # both requests gave their blocks back


def test_late_start_joins_the_recorded_hidden_states(llm: LLM) -> None:
    item = make_workload("rag", 1, seed=7, doc_tokens=40, num_docs=4, style="chatml")[0]
    last = llm.spec.num_layers - 1
    out = late_start_effect(llm, item, [0, last], namespace="ls")
    assert out["naive"][0] > 1e-6
    # From layer 0 the recorded input is each token's embedding: with every reused token joining
    # there, the pass is a full prefill, which fails if a token got another position's state.
    assert out["all@0"][0] <= 1e-6 and out["all@0"][1] == pytest.approx(1.0)
    assert out["blend_R@0"][1] < 1.0 and out[f"all@{last}"][1] < out["all@0"][1]
    # Cached in exactly the prompt's own context, the recorded states at a later layer are the true
    # ones, so restarting every reused token there reproduces full prefill too (states taken from
    # the wrong tokens give KL ~3e-6 on this model).
    same = WorkItem(name="same", warmup=[item.prompt], prompt=item.prompt, answer=None, kind="rag")
    exact = late_start_effect(llm, same, [1], namespace="ls-same")
    assert exact["naive"][0] <= 1e-8 and exact["all@1"][0] <= 1e-7  # fp noise of a separate pass; wrong states: ~3e-6
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks
