"""``sparsex eval``: quality and cost of every reuse method against full prefill, in one run.

Workloads are the real benchmarks (``musique``, ``musique-chat``, ``locomo``, ``locomo-plain``: the
original files read from ``--data DIR``, split as the data's README says) or synthetic ones built from
CPython's help text (``rag``, ``chat``, ``agents``, ...: items depend on (kind, seed, index); ``tune``
is seed 0, ``report`` seed 1000; they draw passages from the same corpus, so the two synthetic
splits can share passages). Every cell gets a seeded bootstrap 95% interval over its items;
headline runs use ``--split report --n 32`` or more. ``--frontier`` sweeps every method over its own
knob and plots quality against TTFT (``frontier.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sparsex.lab.bench.common import machine, print_table, write_json
from sparsex.lab.bench.frontier import FRONTIER_METHODS, expand_sweeps, plot_frontier
from sparsex.lab.stats import RESAMPLES
from sparsex.lab.workloads.common import STYLES, markup_style

DEFAULT_METHODS = "naive,epic,cacheblend,sparsex:hybrid=false,sparsex,blend"
SPLIT_SEEDS = {"tune": 0, "report": 1000}
"""Workload seed of each split: tune = seed 0 (defaults are chosen here), report = seed 1000."""
HEADLINE_ITEMS = 32


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sparsex eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--workloads", default="rag,agents,vartrack",
                    help="comma-separated; lookup,combine are the answerable tasks")
    ap.add_argument("--n", type=int, default=4, help="items per workload (headline: >= 32)")
    ap.add_argument("--split", choices=sorted(SPLIT_SEEDS), default="tune",
                    help="tune: seed 0 (choose defaults here); report: seed 1000 (headline numbers)")
    ap.add_argument("--seed", type=int, default=None, help="workload seed (overrides --split's)")
    ap.add_argument("--doc-tokens", type=int, default=None,
                    help="tokens per document (default 300; lookup/combine: 80)")
    ap.add_argument("--num-docs", type=int, default=None, help="documents per item (default 6; lookup/combine: 4)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated; options after ':' joined by '+', e.g. sparsex:hybrid=false+boundary=8; "
                         "'|' sweeps a knob: blend:budget=0.05|0.1 (default: " + DEFAULT_METHODS + ")")
    ap.add_argument("--frontier", action="store_true",
                    help="sweep every method over its own knob (--methods defaults to the frontier set)")
    ap.add_argument("--frontier-plot", default=None, help="PNG of quality against TTFT / full prefill")
    ap.add_argument("--data", default=None,
                    help="folder of the real benchmarks' files (musique_s.json, locomo.json); default $SPARSEX_DATA")
    ap.add_argument("--max-tokens", type=int, default=None, help="locomo: prompt budget in tokens (default 4000)")
    ap.add_argument("--warm", default="none",
                    help="reuse method (and options, as in --methods) serving the warm-up prompts; default none: "
                         "every cached segment is exact in its own context")
    ap.add_argument("--budgets", default="default",
                    help="comma-separated budgets (fraction of reused tokens); default: the model family's")
    ap.add_argument("--style", choices=("auto", *STYLES), default="auto",
                    help="turn markup of the prompts; auto: the model's own (gemma, chatml), else plain")
    ap.add_argument("--continuation", type=int, default=32, help="greedy tokens compared (match length)")
    ap.add_argument("--forced", type=int, default=16, help="positions compared under teacher forcing")
    ap.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples per cell")
    ap.add_argument("--boot-seed", type=int, default=0, help="seed of the bootstrap")
    ap.add_argument("--out", default="out/eval.json")
    ap.add_argument("--plot", default=None, help="PNG of quality vs cost (first-token and 16-token gap, match)")
    ap.add_argument("--markdown", default=None, help="also write the tables as Markdown (docs/BENCHMARKS.md's layout)")
    ap.add_argument("--from-json", default=None, nargs="+", metavar="JSON",
                    help="run nothing: print (and --markdown / --plot) the tables of earlier runs' --out files; "
                         "several are merged per item (they must be runs of the same items and model)")
    ap.add_argument("--rename", nargs=2, action="append", default=[], metavar=("FROM", "TO"),
                    help="with --from-json: show method FROM as TO, in place of any TO already there "
                         "(e.g. a variant that has since become the default)")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = merge_saved([json.loads(Path(f).read_text()) for f in args.from_json], args.rename)
        return _render(args, _saved_rows(saved))
    if args.rename:
        ap.error("--rename only applies to --from-json")
    if args.methods is None:
        args.methods = FRONTIER_METHODS if args.frontier else DEFAULT_METHODS
    seed = SPLIT_SEEDS[args.split] if args.seed is None else args.seed
    if args.split == "report" and args.n < HEADLINE_ITEMS:
        print(f"note: headline tables use >= {HEADLINE_ITEMS} items per workload (--n {args.n})", file=sys.stderr)

    from sparsex import LLM
    from sparsex.lab.oracle import LAB_PLANNERS
    from sparsex.lab.quality import evaluate_item, parse_method, summarize
    from sparsex.lab.workloads import DEFAULT_SIZES, make_workload
    from sparsex.lab.workloads.real import REAL_WORKLOADS, real_workload

    llm = LLM(model=args.model, planners=LAB_PLANNERS, max_prefill_tokens=None)  # exact, unchunked reference
    budgets = [None if b.strip() == "default" else float(b) for b in args.budgets.split(",")]
    methods = _methods(args.methods, budgets, parse_method)
    style = args.style if args.style != "auto" else markup_style(llm.tokenizer.token_id)
    warm = parse_method(args.warm.replace("+", ",")).reuse
    results = []
    t0 = time.perf_counter()
    for kind in args.workloads.split(","):
        if kind in REAL_WORKLOADS:
            data = args.data or os.environ.get("SPARSEX_DATA")
            if not data:
                ap.error(f"{kind} reads the original benchmark files: pass --data DIR (or set SPARSEX_DATA)")
            extra = {} if args.max_tokens is None else {"max_tokens": args.max_tokens}
            items = real_workload(kind, data, args.split, args.n,
                                  count_tokens=lambda text: len(llm.tokenizer.encode(text)), **extra)
        else:
            doc_tokens, num_docs = DEFAULT_SIZES.get(kind, (300, 6))
            items = make_workload(kind, args.n, seed, doc_tokens=args.doc_tokens or doc_tokens,
                                  num_docs=args.num_docs or num_docs, style=style)
        for i, item in enumerate(items):
            results += evaluate_item(llm, item, methods, namespace=f"eval-{kind}-{i}",
                                     continuation=args.continuation, forced=args.forced, warm=warm)
            print(f"  {kind} {i + 1}/{len(items)} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr,
                  flush=True)
    rows = summarize(results, seed=args.boot_seed, resamples=args.resamples)
    print(f"split {args.split} (seed {seed}), {args.n} items per workload, {style} markup; [95% bootstrap interval]")
    write_json(args.out, {"machine": machine(), "model": llm.model_name, "split": args.split, "seed": seed,
                          "style": style,
                          "args": vars(args), "summary": rows, "runs": [r.__dict__ for r in results]})
    return _render(args, rows)


SAME_ITEMS = ("model", "split", "seed", "style")
"""What two saved runs must share (where both record it) to be merged item by item."""


def merge_saved(saved: list[dict[str, Any]], renames: list[list[str]] | None = None) -> dict[str, Any]:
    """One saved run out of several of the same items (``--from-json A B``), with methods renamed.

    Quality columns are deterministic, so a method on an item found in two runs must give the same
    KL in both (else the runs were not of the same items, model or code, and this raises); the
    first run's copy is kept. A renamed method replaces the target's rows. TTFT stays each run's
    own: medians of methods from different runs compare only if both ran on a quiet machine."""
    if len(saved) == 1 and not renames:
        return saved[0]
    head = saved[0]
    for other in saved[1:]:
        for field in SAME_ITEMS:
            if field in other and field in head and other[field] != head[field]:  # older runs lack "style"
                raise ValueError(f"cannot merge runs with different {field}: {head.get(field)!r} vs {other.get(field)!r}")
    if any(not s.get("runs") for s in saved):
        raise ValueError("merging needs each run's per-item results ('runs'), which this file lacks")
    merged: dict[tuple[str, str, str], dict[str, Any]] = {}
    for s in saved:
        for run in s["runs"]:
            key = (run["kind"], run["item"], run["method"])
            if key in merged:
                if abs(merged[key]["kl"] - run["kl"]) > 1e-6 * max(1.0, abs(run["kl"])):
                    raise ValueError(f"runs disagree on {key}: KL {merged[key]['kl']} vs {run['kl']} "
                                     "(not the same items, model or code)")
                continue
            merged[key] = run
    runs = list(merged.values())
    for src, dst in renames or []:
        if src == dst:
            raise ValueError(f"--rename: {src!r} to itself")
        if not any(r["method"] == src for r in runs):
            raise ValueError(f"--rename: no method {src!r} in these runs")
        runs = [r if r["method"] != src else {**r, "method": dst} for r in runs if r["method"] != dst]
    return {**head, "summary": [], "runs": runs, "merged_from": len(saved)}


def _saved_rows(saved: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary of a saved run, recomputed from its per-item runs (with the run's own bootstrap
    seed and resamples: the same intervals, plus any column added since) where it has them."""
    if not saved.get("runs"):
        return list(saved["summary"])
    from sparsex.lab.quality import RunResult, summarize

    run_args = saved.get("args", {})
    return summarize([RunResult(**r) for r in saved["runs"]], seed=run_args.get("boot_seed", 0),
                     resamples=run_args.get("resamples", RESAMPLES))


def _render(args: argparse.Namespace, rows: list[dict[str, Any]]) -> int:
    """Print the tables; write the Markdown and the plot where asked."""
    _print(rows)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown_tables(rows))
        print(f"wrote {args.markdown}")
    if args.plot:
        plot_quality_cost(rows, args.plot)
    if getattr(args, "frontier_plot", None):
        plot_frontier(rows, args.frontier_plot)
    return 0


def _methods(text: str, budgets: list[float | None], parse: Any) -> list[Any]:
    """Method specs for every method and budget (naive once: it has no budget; None: the family's)."""
    methods: list[Any] = []
    for b in budgets:
        for swept in text.split(","):
            for name, method in expand_sweeps(swept):
                spec = parse(method.replace("+", ","), budget=b)
                tag = "default" if b is None else f"{b:g}"
                label = name if len(budgets) == 1 or spec.reuse["method"] == "naive" else f"{name}@{tag}"
                if not any(m.label == label for m in methods):
                    methods.append(type(spec)(label, spec.options))
    return methods


def _fmt(row: dict[str, Any], key: str, digits: int = 2, percent: bool = False) -> str:
    """``value [lo, hi]`` (``percent``: ``92% [89, 94]``), or ``-`` when the cell has no value."""
    v = row.get(key)
    if v is None:
        return "-"
    ci = row.get("ci", {}).get(key)
    scale, unit = (100, "%") if percent else (1, "")
    text = f"{v * scale:.{digits}f}{unit}"
    return text if ci is None else f"{text} [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def _print(rows: list[dict[str, Any]]) -> None:
    for kind in dict.fromkeys(r["kind"] for r in rows):
        print(f"\n== {kind} ==")
        sub = [r for r in rows if r["kind"] == kind]
        print_table(
            ["method", "n", "top1", "KL", "gap closed", "KL@16", "gap closed @16", "match/32", "acc", "F1",
             "found", "worse than naive", "TTFT s", "TTFT/full", "cost", "recomp"],
            [[r["method"], r["n"], _fmt(r, "top1"), _fmt(r, "kl", 4), _fmt(r, "gap_closed"), _fmt(r, "kl16", 4),
              _fmt(r, "gap_closed16"), _fmt(r, "match32", 1), _fmt(r, "accuracy"), _fmt(r, "f1"),
              _fmt(r, "found"), _worse(r), r["ttft_s"], _fmt(r, "ttft_ratio"), _fmt(r, "cost"),
              r["recomputed"]] for r in sub],
        )


MD_COLUMNS = (("first-token gap closed", "gap_closed", True, 0), ("16-token gap closed", "gap_closed16", True, 0),
              ("KL (first)", "kl", False, 4), ("KL@16", "kl16", False, 4), ("match/32", "match32", False, 1),
              ("accuracy", "accuracy", True, 0), ("F1", "f1", True, 0), ("found", "found", True, 1),
              ("TTFT / full", "ttft_ratio", False, 2))


def _worse(row: dict[str, Any]) -> str:
    """``first / 16 of n``: items on which the method's first-token KL / KL@16 exceeds naive's."""
    if row.get("worse") is None:
        return "-"
    return f"{row['worse']} / {row['worse16']} of {row['n']}"


def markdown_tables(rows: list[dict[str, Any]]) -> str:
    """One Markdown table per workload, as in docs/BENCHMARKS.md: every metric with its 95% interval,
    the items worse than naive (first token / 16 tokens), then the median TTFT and the mean cost."""
    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        sub = [r for r in rows if r["kind"] == kind]
        reused = max(r.get("reused", 0.0) for r in sub)
        out.append(f"**{kind}** ({sub[0]['n']} items, {sub[0]['tokens']:.0f} prompt tokens on average, "
                   f"{reused * 100:.0f}% reused)\n")
        head = ["method", *(c[0] for c in MD_COLUMNS), "worse than naive", "TTFT s", "cost"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|---|" + "---:|" * (len(head) - 1))
        for r in sub:
            cells = [r["method"], *(_fmt(r, key, dg, pct) for _, key, pct, dg in MD_COLUMNS), _worse(r),
                     f"{r['ttft_s']:.2f}", f"{r['cost']:.2f}"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


PANELS = (("gap_closed", "KL gap closed, first token"), ("gap_closed16", "KL gap closed, 16 forced tokens"),
          ("match32", "greedy match length (of 32)"))


def plot_quality_cost(rows: list[dict[str, Any]], path: str) -> None:
    """One column per workload; rows: first-token gap, 16-token gap, match length, each against
    cost, with the bootstrap intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(len(PANELS), len(kinds), figsize=(5 * len(kinds), 3.6 * len(PANELS)), squeeze=False)
    for col, kind in enumerate(kinds):
        for row_i, (key, label) in enumerate(PANELS):
            ax = axes[row_i][col]
            by_method: dict[str, list[tuple[float, float, float, float]]] = {}
            for r in rows:
                if r["kind"] == kind and r.get(key) is not None:
                    lo, hi = r["ci"].get(key) or (r[key], r[key])
                    by_method.setdefault(r["method"].split("@")[0], []).append((r["cost"], r[key], lo, hi))
            for j, (m, pts) in enumerate(sorted(by_method.items())):
                pts.sort()
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                            marker="os^D"[j % 4], linestyle=["-", "--", ":", "-."][j // 10 % 4], capsize=2,
                            color=plt.get_cmap("tab10")(j % 10), label=m)
            ax.set_title(f"{kind}: {label}", fontsize=9)
            ax.set_xlabel("cost (fraction of full-prefill compute)")
            ax.grid(alpha=0.3)
            if row_i == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
