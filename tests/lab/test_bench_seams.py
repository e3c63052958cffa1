"""``sparsex bench seams``: lost tokens are classified, and overlapping passages served alone (each
reusing its neighbour) are all found when pasted together."""

from __future__ import annotations

import json
from pathlib import Path

from sparsex.lab.bench.seams import classify_lost
from sparsex.lab.bench.seams import main as seams_main
from sparsex.lab.workloads.corpus import passages


def test_classify_lost_tells_seams_from_runs() -> None:
    r, f = True, False
    reusable = [r] * 40 + [f] * 2 + [r] * 30
    found = [f] * 3 + [True] * 17 + [f] * 20 + [f] * 2 + [True] * 25 + [f] * 5
    # 0..2 lost next to found (seam), 20..39 lost (20 tokens: a run), 67..71 lost at the end (seam)
    assert classify_lost(reusable, found, seam=16) == (3 + 5, 20)
    assert classify_lost([r] * 10, [f] * 10, seam=16) == (0, 10)  # nothing found: not a seam
    assert classify_lost([], [], seam=16) == (0, 0)


def test_overlapping_passages_are_found(tiny_model_dir, tmp_path: Path) -> None:
    text = " ".join(passages(400, 600, seed=9))[:560]
    q = len(text) // 3
    # neighbouring windows of one article: the second passage's first half is the first one's second
    ctxs = [{"title": "", "text": text[a : a + 2 * q]} for a in (0, q)]
    (tmp_path / "musique_s.json").write_text(json.dumps([{"question": "What", "answers": ["x"], "ctxs": ctxs}]))
    out = tmp_path / "seams.json"
    seams_main(["--model", str(tiny_model_dir("llama")), "--data", str(tmp_path), "--workloads", "musique",
                "--n", "1", "--warm", "none,blend", "--out", str(out)])
    rows = {r["warm"]: r for r in json.loads(out.read_text())["rows"]}
    for warm in ("none", "blend"):  # served with reuse, a passage's new part is still published
        assert rows[warm]["reusable"] > 150
        assert rows[warm]["found_share"] >= 0.97, rows[warm]
