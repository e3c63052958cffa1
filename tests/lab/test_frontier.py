"""Sweeps (`|` in --methods), and a frontier run of `sparsex eval` on a tiny model over a small file in
MuSiQue's format: every point is a row, the exact point closes the whole gap, the plot is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsex.lab.bench.evaluate import main as eval_main
from sparsex.lab.bench.frontier import FRONTIER_METHODS, expand_sweeps
from sparsex.lab.workloads.corpus import passages


def test_expand_sweeps_labels_each_point_by_its_knob() -> None:
    assert expand_sweeps("naive") == [("naive", "naive")]
    assert expand_sweeps("sparsex:hybrid=false") == [("sparsex:hybrid=false", "sparsex:hybrid=false")]
    assert expand_sweeps("blend:budget=0.05|0.1+shift=0") == [
        ("blend:shift=0@budget=0.05", "blend:shift=0+budget=0.05"),
        ("blend:shift=0@budget=0.1", "blend:shift=0+budget=0.1")]
    assert [label for label, _ in expand_sweeps("epic:epic_tokens=4|16+budget=1|2")] == [
        "epic@epic_tokens=4,budget=1", "epic@epic_tokens=4,budget=2",
        "epic@epic_tokens=16,budget=1", "epic@epic_tokens=16,budget=2"]
    families = {label.split("@")[0] for part in FRONTIER_METHODS.split(",") for label, _ in expand_sweeps(part)}
    assert families == {"naive", "blend", "cacheblend", "epic", "sparsex", "oracle"}


def test_frontier_run_on_a_tiny_model(tiny_model_dir, tmp_path: Path) -> None:
    texts = passages(160, 240, seed=4)[:4]
    record = {"question": "Which passage is first", "answers": ["the first one"],
              "ctxs": [{"title": f"Doc {i}", "text": t} for i, t in enumerate(texts)]}
    (tmp_path / "musique_s.json").write_text(json.dumps([record]))
    out, plot = tmp_path / "eval.json", tmp_path / "frontier.png"
    eval_main(["--model", str(tiny_model_dir("llama")), "--workloads", "musique", "--data", str(tmp_path),
               "--n", "1", "--methods", "naive,blend:budget=0.2|1.0", "--continuation", "4", "--forced", "4",
               "--resamples", "20", "--out", str(out), "--frontier-plot", str(plot)])
    rows = {r["method"]: r for r in json.loads(out.read_text())["summary"]}
    assert set(rows) == {"none", "naive", "blend@budget=0.2", "blend@budget=1.0"}
    assert rows["naive"]["kl16"] > 1e-6 and rows["naive"]["found"] > 0.9
    assert rows["blend@budget=1.0"]["gap_closed16"] == pytest.approx(1.0, abs=1e-3)  # recomputes everything
    assert rows["blend@budget=0.2"]["recomputed"] < rows["blend@budget=1.0"]["recomputed"]
    for r in rows.values():
        assert r["f1"] is not None and 0.0 <= r["f1"] <= 1.0 and r["ttft_ratio"] is not None
    assert rows["none"]["ttft_ratio"] == 1.0
    assert plot.exists() and plot.stat().st_size > 0
