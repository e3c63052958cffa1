"""``benchmarks/peers``: the prompts every engine gets are deterministic and survive the JSON hand-off
byte for byte, and a worker serves each warm prompt before the timed one that may reuse it."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

PEERS = Path(__file__).resolve().parents[2] / "benchmarks" / "peers"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"peers_{name}", PEERS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def musique_file(folder: Path) -> Path:
    items = [{"question": f"Who wrote book {i}", "answers": ["x"],
              "ctxs": [{"title": f"T{i}.{j}", "text": f"passage {j} of item {i}."} for j in range(10)]}
             for i in range(3)]
    (folder / "musique_s.json").write_text(json.dumps(items))
    return folder


def test_plan_is_deterministic_and_byte_identical_after_json(tiny_model_dir: Any, tmp_path: Path) -> None:
    prompts = load("prompts")
    data = musique_file(tmp_path)
    plan = prompts.build_plan(tiny_model_dir("llama"), data, num_docs=4, doc_tokens=24, musique_items=2)
    again = prompts.build_plan(tiny_model_dir("llama"), data, num_docs=4, doc_tokens=24, musique_items=2)
    assert json.dumps(plan) == json.dumps(again)
    assert json.loads(json.dumps(plan)) == plan  # what a worker reads is what the driver built
    assert prompts.scenarios(plan) == ["cold", "exact repeat", "reordered", "half new", "musique cold", "musique"]

    steps = {s["scenario"]: s["prompt"] for s in plan["groups"][0]["steps"]}
    assert steps["cold"] == steps["exact repeat"]
    assert steps["reordered"] != steps["cold"] and sorted(steps["reordered"]) == sorted(steps["cold"])
    # half new keeps the first two documents in place: a cached prefix, then new text
    second_doc_end = steps["cold"].index("Document 3:")
    assert steps["half new"][:second_doc_end] == steps["cold"][:second_doc_end]
    assert steps["half new"][second_doc_end:] != steps["cold"][second_doc_end:]
    assert plan["warmup"][0] not in steps.values()


def test_musique_follows_cacheblend(tmp_path: Path) -> None:
    prompts = load("prompts")
    item = json.loads(musique_file(tmp_path).joinpath("musique_s.json").read_text())[1]
    passages, prompt = prompts.musique_prompts(item)
    assert passages[3] == "T1.3\n\npassage 3 of item 1.\n\n"
    assert prompt == prompts.MUSIQUE_PREFIX + "".join(passages) + prompts.MUSIQUE_QUERY + "who wrote book 1?\nAnswer:"
    assert prompts.musique_question("Is it?") == "is it?"
    # the full prompt timed cold, caches emptied, each passage served alone, then the prompt again
    steps = prompts.musique_group(1, item)["steps"]
    assert steps[0] == {"scenario": "musique cold", "prompt": prompt} and steps[1] == prompts.RESET
    assert [s["prompt"] for s in steps[2:-1]] == passages and all(s["scenario"] is None for s in steps[2:-1])
    assert steps[-1] == {"scenario": "musique", "prompt": prompt}


class FakeEngine:
    def __init__(self, keeps_cache: bool) -> None:
        self.keeps_cache = keeps_cache
        self.calls: list[str] = []

    def first_token(self, prompt: str) -> dict[str, Any]:
        self.calls.append(prompt)
        return {"prompt_tokens": len(prompt)}

    def reset(self) -> None:
        self.calls.append("<reset>")


def test_worker_serves_warm_prompts_first_and_empties_caches_per_group() -> None:
    worker = load("worker")
    plan = {"warmup": ["w"], "groups": [
        {"name": "a", "steps": [{"scenario": "cold", "prompt": "p"}, {"scenario": "exact repeat", "prompt": "p"}]},
        {"name": "b", "steps": [{"scenario": "musique cold", "prompt": "q"}, {"reset": True},
                                {"scenario": None, "prompt": "d1"}, {"scenario": "musique", "prompt": "q"}]},
    ]}
    caching = FakeEngine(keeps_cache=True)
    rows = worker.run(caching, plan, repeats=2)
    one = ["<reset>", "p", "p", "<reset>", "q", "<reset>", "d1", "q"]
    assert caching.calls == ["w", *one, *one]
    assert [(r["scenario"], r["repeat"]) for r in rows[:4]] == [
        ("cold", 0), ("exact repeat", 0), ("musique cold", 0), ("musique", 0)]
    assert len(rows) == 8 and all(r["ttft_s"] >= 0 and r["prompt_tokens"] == 1 for r in rows)
    # an engine with no cache across requests skips warm requests: they could not change a time
    stateless = FakeEngine(keeps_cache=False)
    worker.run(stateless, plan, repeats=1)
    assert "d1" not in stateless.calls


def test_driver_rows_and_summary() -> None:
    run = load("run")
    args = run.parse_args(["--engines", "transformers,vllm,sparsex", "--sparsex-methods", "default,naive"])
    assert [label for label, _, _ in run.rows_to_run(args)] == ["transformers", "vllm", "sparsex", "sparsex naive"]
    assert isinstance(args, argparse.Namespace) and args.data.endswith("shared/data")

    def rows(times: dict[str, float]) -> dict[str, Any]:
        return {"rows": [{"scenario": s, "ttft_s": t, "prompt_tokens": 10} for s, t in times.items()]}

    results = {"transformers": rows({"cold": 2.0, "exact repeat": 2.0, "musique cold": 4.0, "musique": 4.0}),
               "vllm": rows({"cold": 4.0, "exact repeat": 1.0, "musique cold": 8.0, "musique": 2.0}),
               "broken": {"error": "exit 1"}}
    summary = run.summarize(results, ["cold", "exact repeat", "musique cold", "musique"])
    assert set(summary) == {"transformers", "vllm"}
    assert summary["vllm"]["exact repeat"]["vs_cold"] == 0.25
    assert summary["vllm"]["musique"]["vs_cold"] == 0.25  # against musique cold, not the 8-document cold
    assert summary["vllm"]["cold"]["vs_transformers"] == 2.0
