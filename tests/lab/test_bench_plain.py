"""``sparsex bench reuse --plain`` on a tiny model: reordered plain-string documents are found,
replaced ones are not, and every row carries its quality against ``none``."""

from __future__ import annotations

import json
from typing import Any

from sparsex.cli import main


def test_plain_bench_finds_reordered_documents(tiny_model_dir: Any, tmp_path: Any) -> None:
    out, plot = tmp_path / "plain.json", tmp_path / "plain.png"
    rc = main(["bench", "reuse", "--plain", "--model", str(tiny_model_dir("llama")), "--lengths", "320",
               "--docs", "4", "--repeats", "1", "--match", "4", "--out", str(out), "--plot", str(plot)])
    assert rc == 0 and plot.exists()
    rows = {(r["phase"], r["method"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(p, m) for p in ("reordered", "half replaced") for m in ("none", "naive", "blend")}
    assert rows[("reordered", "none")]["found"] == 0 and rows[("reordered", "none")]["kl"] == 0.0
    assert rows[("reordered", "naive")]["found_share"] >= 0.9
    # only document tokens count (not the instruction or the labels), so it never passes 100%
    assert all(r["found"] <= r["doc_tokens"] and r["found_share"] <= 1.0 for r in rows.values())
    assert rows[("reordered", "naive")]["hit_tokens"] >= rows[("reordered", "naive")]["found"]
    assert rows[("reordered", "naive")]["runs"] >= 4
    # half replaced: only the cached half is counted and found
    assert rows[("half replaced", "naive")]["doc_tokens"] < rows[("reordered", "naive")]["doc_tokens"]
    assert rows[("half replaced", "naive")]["found_share"] >= 0.9
    assert all(0 <= r["match4"] <= 4 and r["kl"] >= 0 for r in rows.values())
    # lookup and load are split out and add up to the overhead
    naive = rows[("reordered", "naive")]
    assert naive["load_s"] > 0 and naive["lookup_s"] > 0
    assert abs(naive["overhead_s"] - (naive["lookup_s"] + naive["load_s"])) < 1e-9  # one repeat: same sample
    assert 0 < naive["overhead_share"] < 1


def test_bench_documents_are_distinct() -> None:
    """The corpus repeats a few paragraphs; a benchmark's documents never do (a repeat would be a
    free hit and one fewer entry than documents). These arguments drew a repeat before the fix."""
    from sparsex.lab.bench.plain import documents

    class Words:  # a whitespace tokenizer: one token per word
        def encode(self, text: str) -> list[str]:
            return text.split()

        def decode(self, toks: list[str]) -> str:
            return " ".join(toks)

    class Engine:
        tokenizer = Words()

    docs = documents(Engine(), 16, 100, seed=7)
    assert len(docs) == 16 and len(set(docs)) == 16
