"""``sparsex eval``: quality and cost of every reuse method against full prefill, in one run."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from sparsex.lab.bench.common import machine, print_table, write_json

DEFAULT_METHODS = "naive,epic,cacheblend,sparsex:hybrid=false,sparsex,blend"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sparsex eval", description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--workloads", default="rag,agents,vartrack")
    ap.add_argument("--n", type=int, default=4, help="items per workload")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--doc-tokens", type=int, default=300)
    ap.add_argument("--num-docs", type=int, default=6)
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help="comma-separated; options after ':' joined by '+', e.g. sparsex:hybrid=false+boundary=8")
    ap.add_argument("--budgets", default="0.15", help="comma-separated budgets (fraction of reused tokens)")
    ap.add_argument("--continuation", type=int, default=32)
    ap.add_argument("--out", default="out/eval.json")
    ap.add_argument("--plot", default=None, help="PNG of quality vs cost (needs several budgets)")
    args = ap.parse_args(argv)

    from sparsex import LLM
    from sparsex.lab.oracle import LAB_PLANNERS
    from sparsex.lab.quality import evaluate_item, parse_method, summarize
    from sparsex.lab.workloads import make_workload

    llm = LLM(model=args.model, planners=LAB_PLANNERS)
    budgets = [float(b) for b in args.budgets.split(",")]
    methods: list[Any] = []
    for b in budgets:
        for text in args.methods.split(","):
            spec = parse_method(text.replace("+", ","), budget=b)
            label = text if len(budgets) == 1 or spec.reuse["method"] == "naive" else f"{text}@{b:g}"
            if any(m.label == label for m in methods):
                continue
            methods.append(type(spec)(label, spec.options))
    results = []
    t0 = time.perf_counter()
    for kind in args.workloads.split(","):
        items = make_workload(kind, args.n, args.seed, doc_tokens=args.doc_tokens, num_docs=args.num_docs,
                              style="chatml")
        for i, item in enumerate(items):
            results += evaluate_item(llm, item, methods, namespace=f"eval-{kind}-{i}",
                                     continuation=args.continuation)
            print(f"  {kind} {i + 1}/{len(items)} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr,
                  flush=True)
    rows = summarize(results)
    _print(rows)
    write_json(args.out, {"machine": machine(), "model": llm.model_name, "args": vars(args),
                          "summary": rows, "runs": [r.__dict__ for r in results]})
    if args.plot:
        plot_quality_cost(rows, args.plot)
    return 0


def _fmt(v: Any) -> Any:
    return "-" if v is None else v


def _print(rows: list[dict[str, Any]]) -> None:
    for kind in dict.fromkeys(r["kind"] for r in rows):
        print(f"\n== {kind} ==")
        sub = [r for r in rows if r["kind"] == kind]
        print_table(
            ["method", "top1", "KL", "gap closed", "match/32", "acc", "TTFT s", "cost", "recomp"],
            [[r["method"], r["top1"], f"{r['kl']:.4f}", _fmt(r["gap_closed"] and round(r["gap_closed"], 2)),
              r["match32"], _fmt(r["accuracy"]), r["ttft_s"], r["cost"], r["recomputed"]] for r in sub],
        )


def plot_quality_cost(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        by_method: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["kind"] == kind and r["gap_closed"] is not None:
                by_method.setdefault(r["method"].split("@")[0], []).append((r["cost"], r["gap_closed"]))
        styles = ["-", "--", ":", "-."]
        for j, (m, pts) in enumerate(sorted(by_method.items())):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^D"[j % 4], linestyle=styles[j // 10 % 4],
                    color=plt.get_cmap("tab10")(j % 10), label=m)
        ax.set_title(kind)
        ax.set_xlabel("cost (fraction of full-prefill compute)")
        ax.set_ylabel("naive->full KL gap closed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
