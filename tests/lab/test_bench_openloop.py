"""``sparsex bench serve --open-loop``: seeded Poisson arrivals, honest summaries, and a run end to
end on the tiny model (nothing is timed: counts and shapes only)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sparsex.lab.bench.load import Sent
from sparsex.lab.bench.openloop import Stream, arrivals, parse_streams, summarize


def test_arrivals_are_seeded_poisson_streams() -> None:
    streams = parse_streams("a:long:0.5,b:short:4")
    assert streams == [Stream("a", "long", 0.5), Stream("b", "short", 4.0)]
    plan = arrivals(streams, scale=2.0, duration_s=200.0, seed=3)
    assert plan == arrivals(streams, scale=2.0, duration_s=200.0, seed=3)
    assert [r.arrival_s for r in plan] == sorted(r.arrival_s for r in plan) and plan[-1].arrival_s < 200.0
    counts = {k: sum(r.kind == k for r in plan) for k in ("long", "short")}
    assert 140 <= counts["long"] <= 260 and 1400 <= counts["short"] <= 1800  # rate x scale x duration, +-
    assert all(r.tenant == ("a" if r.kind == "long" else "b") for r in plan)


@pytest.mark.parametrize("bad", ["c:short:1", "a:medium:1", "a:short:0", "a:short"])
def test_bad_streams_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_streams(bad)


def test_summary_counts_every_request_and_says_max_below_enough_samples() -> None:
    sent = [Sent("a", "short", i, ttft_s=0.1 * (i + 1), status=200) for i in range(150)]
    sent += [Sent("a", "long", 0.0, ttft_s=9.0, status=200), Sent("a", "long", 1.0, status=429),
             Sent("b", "short", 2.0, status=0, error="ReadTimeout")]
    rows = {(r["tenant"], r["kind"]): r for r in summarize(sent)}
    assert list(rows) == [("a", "long"), ("a", "short"), ("b", "short"), ("all", "all")]
    short, long = rows[("a", "short")], rows[("a", "long")]
    assert short["ttft_s"]["n"] == 150 and short["ttft_s"]["p99"] == pytest.approx(14.9)
    assert long["ttft_s"] == {"n": 1, "p50": None, "p90": None, "p99": None, "max": 9.0}
    assert (long["sent"], long["answered"], long["rejected_429"], long["failed"]) == (2, 1, 1, 0)
    assert rows[("b", "short")]["failed"] == 1 and rows[("all", "all")]["sent"] == 153


def test_open_loop_runs_chunked_and_not(tiny_model_dir: Any, tmp_path: Any) -> None:
    from sparsex.cli import main

    out = tmp_path / "openloop.json"
    rc = main(["bench", "serve", "--open-loop", "--model", str(tiny_model_dir("llama")),
               "--streams", "a:long:3,a:short:6,b:short:12", "--scales", "1", "--chunks", "32,0",
               "--duration", "1.5", "--long-chars", "600", "--doc-chars", "200", "--max-tokens", "2",
               "--out", str(out)])
    assert rc == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["max_prefill_tokens"] for r in runs] == [32, None]
    for r in runs:
        everything = r["rows"][-1]
        assert everything["tenant"] == "all" and everything["sent"] == len(r["requests"]) > 0
        assert everything["answered"] == everything["sent"], [q for q in r["requests"] if q["ttft_s"] is None]
        assert {q["tenant"] for q in r["requests"]} == {"a", "b"}
