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
    for r in runs:  # at most 6 samples: no honest p90 / p99, only the max
        t = r["short_ttft"]
        assert t["n"] == r["num_short"] == len(r["short_ttft_s"]) and t["max"] == max(r["short_ttft_s"])
        assert t["p90"] is None and t["p99"] is None
