"""Bootstrap intervals: seeded and reproducible, paired for the gap closed, and in the summary."""

from __future__ import annotations

import json

import pytest

from sparsex.lab.quality import RunResult, summarize
from sparsex.lab.stats import bootstrap_interval, gap_closed_of, mean_of


def test_bootstrap_is_seeded_and_reproducible() -> None:
    values = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3, 0.8, 0.05]
    a = bootstrap_interval(len(values), mean_of(values), seed="cell")
    assert a == bootstrap_interval(len(values), mean_of(values), seed="cell")
    assert a != bootstrap_interval(len(values), mean_of(values), seed="other")
    assert a is not None and a[0] <= sum(values) / len(values) <= a[1]
    assert bootstrap_interval(4, mean_of([2.0] * 4), seed=0) == (2.0, 2.0)
    assert bootstrap_interval(0, mean_of([]), seed=0) is None


def test_more_items_give_a_narrower_interval() -> None:
    few = [float(i % 2) for i in range(8)]
    many = [float(i % 2) for i in range(128)]
    lo_f, hi_f = bootstrap_interval(len(few), mean_of(few), seed=1) or (0, 0)
    lo_m, hi_m = bootstrap_interval(len(many), mean_of(many), seed=1) or (0, 0)
    assert hi_m - lo_m < (hi_f - lo_f) / 2


def test_gap_closed_resamples_the_same_items_for_both_methods() -> None:
    naive = [1.0, 2.0, 4.0, 8.0]
    method = [0.5 * x for x in naive]  # closes half of every item's gap: no spread at all if paired
    assert bootstrap_interval(4, gap_closed_of(method, naive), seed=3) == pytest.approx((0.5, 0.5))
    assert gap_closed_of([0.0], [0.0])([0]) is None  # undefined, skipped


def _run(item: str, method: str, kl: float, correct: bool) -> RunResult:
    return RunResult(item=item, kind="lookup", method=method, top1=True, kl=kl, match_len=32, correct=correct,
                     ttft_s=0.1, compute_fraction=0.2, recomputed_fraction=0.2, segment_hit_fraction=0.8,
                     prompt_tokens=100, kl_forced=2 * kl, kl_steps=[kl, 3 * kl])


def test_summary_cells_carry_reproducible_intervals() -> None:
    runs = [_run(f"i{j}", m, kl * (j + 1), correct=j % 3 != 0)
            for j in range(6) for m, kl in (("naive", 0.1), ("blend", 0.02))]
    rows = {r["method"]: r for r in summarize(runs, seed=7)}
    again = {r["method"]: r for r in summarize(runs, seed=7)}
    assert rows == again
    blend = rows["blend"]
    assert blend["gap_closed"] == pytest.approx(0.8) and blend["gap_closed16"] == pytest.approx(0.8)
    assert blend["ci"]["gap_closed"] == pytest.approx([0.8, 0.8])  # paired: every item closes 80%
    lo, hi = blend["ci"]["accuracy"]
    assert blend["accuracy"] == pytest.approx(4 / 6) and lo <= blend["accuracy"] <= hi
    assert blend["ci"]["kl16"][0] <= blend["kl16"] <= blend["ci"]["kl16"][1]


def test_markdown_tables_render_a_saved_run_without_a_model(tmp_path, capsys) -> None:
    from sparsex.lab.bench.evaluate import main, markdown_tables

    runs = [_run(f"i{j}", m, kl * (j + 1), correct=j % 3 != 0)
            for j in range(6) for m, kl in (("naive", 0.1), ("blend", 0.02), ("bad", 0.2 if j % 2 else 0.01))]
    rows = summarize(runs, seed=7)
    assert [(r["method"], r["worse"], r["worse16"]) for r in rows] == [("naive", 0, 0), ("blend", 0, 0), ("bad", 3, 3)]
    text = markdown_tables(rows)
    lines = text.splitlines()
    assert lines[0] == "**lookup** (6 items, 100 prompt tokens on average, 80% reused)"
    assert lines[2].startswith("| method | first-token gap closed | 16-token gap closed |")
    blend = next(line for line in lines if line.startswith("| blend |")).split(" | ")
    assert blend[1] == "80% [80, 80]" and blend[-3:] == ["0 / 0 of 6", "0.10", "0.20 |"]
    assert next(line for line in lines if line.startswith("| bad |")).split(" | ")[-3] == "3 / 3 of 6"
    lo, hi = rows[1]["ci"]["accuracy"]  # rows[1] is blend (asserted above)
    assert blend[6] == f"67% [{lo * 100:.0f}, {hi * 100:.0f}]"
    # --from-json re-renders an earlier run's --out file: same tables, no model loaded
    saved, md = tmp_path / "run.json", tmp_path / "tables.md"
    saved.write_text(json.dumps({"summary": rows}))
    assert main(["--from-json", str(saved), "--markdown", str(md)]) == 0
    assert md.read_text() == text
    # with its per-item runs, the summary is recomputed with the run's bootstrap seed: the same tables
    saved.write_text(json.dumps({"summary": [], "args": {"boot_seed": 7, "resamples": 1000},
                                 "runs": [r.__dict__ for r in runs]}))
    assert main(["--from-json", str(saved), "--markdown", str(md)]) == 0
    assert md.read_text() == text
    assert "gap closed @16" in capsys.readouterr().out


def test_saved_runs_of_the_same_items_merge_and_a_variant_takes_the_defaults_name(tmp_path) -> None:
    from sparsex.lab.bench.evaluate import main, merge_saved

    def saved(methods: tuple[tuple[str, float], ...], **head: object) -> dict:
        runs = [_run(f"i{j}", m, kl * (j + 1), correct=True) for j in range(4) for m, kl in methods]
        return {"model": "m", "split": "report", "seed": 1000, "style": "chatml", "summary": [],
                "args": {"boot_seed": 0}, "runs": [r.__dict__ for r in runs], **head}

    first = saved((("naive", 0.1), ("blend", 0.05), ("cacheblend", 0.08)))
    second = saved((("naive", 0.1), ("blend:candidates=6", 0.02)))
    merged = merge_saved([first, second], [["blend:candidates=6", "blend"]])
    rows = {r["method"]: r for r in summarize([RunResult(**r) for r in merged["runs"]])}
    assert list(rows) == ["naive", "cacheblend", "blend"]  # naive once; the variant replaced the old row
    assert rows["blend"]["gap_closed"] == pytest.approx(0.8) and rows["blend"]["n"] == 4
    assert rows["cacheblend"]["gap_closed"] == pytest.approx(0.2)
    # runs that are not of the same items (a method's KL differs, or the split) do not merge
    with pytest.raises(ValueError, match="disagree"):
        merge_saved([first, saved((("naive", 0.11),))])
    with pytest.raises(ValueError, match="split"):
        merge_saved([first, saved((("naive", 0.1),), split="tune")])
    with pytest.raises(ValueError, match="no method"):
        merge_saved([first, second], [["blend:candidates=4", "blend"]])
    a, b, md = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "t.md"
    a.write_text(json.dumps(first))
    b.write_text(json.dumps(second))
    assert main(["--from-json", str(a), str(b), "--rename", "blend:candidates=6", "blend", "--markdown", str(md)]) == 0
    table = md.read_text()
    assert "| blend | 80% [80, 80] |" in table and "candidates" not in table
