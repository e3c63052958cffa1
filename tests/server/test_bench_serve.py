"""The serving benchmark runs end to end on the tiny model and writes its JSON (nothing is timed)."""

from __future__ import annotations

import json
from pathlib import Path

from sparsex.lab.bench import serve


def test_bench_serve_smoke(model_dir: Path, tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "bench.json"
    rc = serve.main(["--model", str(model_dir), "--conversations", "2", "--turns", "2", "--max-tokens", "2",
                     "--doc-chars", "120", "--concurrency", "2", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    off, on = data["runs"]
    assert off["reuse"] == "none" and on["reuse"] == data["reuse_method"]
    for run in (off, on):
        assert run["num_requests"] == 4 == len(run["requests"])
        assert run["ttft_p50_s"] <= run["ttft_max_s"] and run["ttft_p99_s"] is None  # 4 requests: no p99
        assert 0.0 <= run["cached_fraction"] <= 1.0
        assert all(r["prompt_tokens"] > 0 and r["completion_tokens"] >= 1 for r in run["requests"])


def test_workload_is_seeded() -> None:
    args = serve.parse_args(["--conversations", "3", "--doc-chars", "200", "--seed", "5"])
    a, b = serve.make_conversations(args), serve.make_conversations(args)
    assert a == b
    assert [c.kind for c in a] == ["rag", "agents", "rag"]
    rag = serve.turn_messages(a[0], 0, [])
    assert rag[0]["role"] == "system" and len(rag[1]["content"]) == args.docs + 1
    agents = serve.turn_messages(a[1], 1, [("Planner", "step one")])
    assert agents[0]["content"] in serve.AGENTS.values() and "step one" in str(agents)
