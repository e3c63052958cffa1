"""``sparsex bench serve --fairness`` on a tiny model: both settings run and report short TTFTs."""

from __future__ import annotations

import json
from typing import Any

from sparsex.cli import main


def test_fairness_bench_runs_both_settings(tiny_model_dir: Any, tmp_path: Any) -> None:
    out = tmp_path / "fair.json"
    rc = main(["bench", "serve", "--fairness", "--model", str(tiny_model_dir("llama")), "--long", "2",
               "--long-tokens", "600", "--chunk", "64", "--interval", "0.01", "--max-short", "6", "--out", str(out)])
    assert rc == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["chunked_prefill"] for r in runs] == [None, 64]
    assert all(r["num_long"] == 2 and 1 <= r["num_short"] <= 6 for r in runs)
    assert all(r["short_ttft_p50_s"] <= r["short_ttft_max_s"] for r in runs)
