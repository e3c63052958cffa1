"""``sparsex bench reuse``'s parts on a tiny model: the prompt reuses its documents, and the load
breakdown moves exactly the reused rows and gives every block back."""

from __future__ import annotations

from typing import Any

from sparsex import LLM, SamplingParams
from sparsex.lab.bench.reuse import load_breakdown, rag_prompt


def test_load_breakdown_moves_the_reused_rows_and_leaks_nothing(tiny_model_dir: Any) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), kv_cache_memory=16 << 20)
    prompt, docs = rag_prompt(llm, num_docs=3, doc_tokens=40, seed=1)
    llm.cache_segments(docs, namespace="b")
    out = llm.generate([prompt], SamplingParams(max_tokens=1), reuse={"method": "naive", "namespace": "b"})[0]
    hits = out.metrics.num_segment_hit_tokens
    assert hits == 3 * 40
    parts = load_breakdown(llm, prompt, "b", repeats=2)
    assert parts["rows"] == hits
    assert all(parts[k] > 0 for k in ("lookup", "load", "copy_floor"))
    assert not llm.has_unfinished()
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks - llm.engine.pool.num_pinned_blocks


def test_bench_reuse_reports_quality_next_to_ttft(tiny_model_dir: Any, tmp_path: Any) -> None:
    import json

    from sparsex.lab.bench.reuse import main

    out = tmp_path / "reuse.json"
    assert main(["--model", str(tiny_model_dir("llama")), "--docs", "3", "--doc-tokens", "40", "--repeats", "1",
                 "--methods", "naive,blend", "--out", str(out), "--plot", ""]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]["120"]}
    assert set(rows) == {"none", "naive", "blend"}
    assert rows["none"]["kl"] == 0.0 and rows["none"]["top1"]
    assert rows["naive"]["kl"] > 0 and rows["naive"]["gap_closed"] == 0.0
    assert rows["blend"]["gap_closed"] is not None and rows["blend"]["kl"] < rows["naive"]["kl"]
