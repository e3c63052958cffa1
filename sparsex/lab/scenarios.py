"""The three reuse scenarios of ``sparsex demo``: every method's TTFT and fidelity side by side."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sparsex.lab.bench.common import print_table
from sparsex.lab.quality import evaluate_item, parse_method
from sparsex.lab.workloads import make_workload

if TYPE_CHECKING:
    from sparsex.llm import LLM

SCENARIOS = [
    ("rag", "RAG: cached documents in a new order behind a new question"),
    ("chat", "Chat: earlier turns re-inserted after the history was trimmed / the system prompt changed"),
    ("agents", "Agents: shared tool output and messages under another agent's system prompt"),
]
METHODS = ["prefix", "naive", "epic", "cacheblend", "sparsex:hybrid=false", "sparsex", "blend"]


def run_scenarios(llm: LLM, quick: bool = False) -> int:
    methods = [parse_method(m) for m in METHODS]
    for kind, title in SCENARIOS:
        item = make_workload(kind, 1, seed=7, doc_tokens=150 if quick else 300, num_docs=4 if quick else 6,
                             style="chatml")[0]
        t0 = time.perf_counter()
        results = evaluate_item(llm, item, methods, namespace=f"demo-{kind}", continuation=16)
        ref = results[0]
        print(f"\n== {title} ==")
        print(f"   {ref.prompt_tokens} prompt tokens; reference = full prefill (TTFT {ref.ttft_s:.2f}s); "
              f"ran in {time.perf_counter() - t0:.0f}s")
        print_table(
            ["method", "TTFT s", "speedup", "cost", "KL vs full", "same 1st token", "match/16"],
            [[r.method, r.ttft_s, f"{ref.ttft_s / r.ttft_s:.1f}x", r.compute_fraction, f"{r.kl:.4f}",
              "yes" if r.top1 else "no", r.match_len] for r in results],
        )
    print("\ncost = fraction of full-prefill compute spent; KL = divergence of the next-token "
          "distribution from full prefill (0 = identical).")
    return 0
