"""``sparsex bench reuse``: TTFT of every reuse method on a RAG prompt of cached documents.

The documents (real text) are cached once, each alone; the test prompt puts them in a new
order behind a short instruction and before a question, so >= 85% of its tokens are reused.
All methods run side by side in one process, interleaved, and are reported as ratios to ``none``;
each method's quality on the same prompt (KL of the first next-token distribution against ``none``,
share of naive's KL closed, same top-1 token) is measured in one more, untimed run.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from sparsex.lab.bench.common import machine, print_table, write_json

METHODS: list[tuple[str, dict[str, Any]]] = [
    ("none", {"method": "none"}),
    ("prefix", {"method": "prefix"}),
    ("naive", {"method": "naive"}),
    ("epic", {"method": "epic"}),
    ("cacheblend", {"method": "cacheblend"}),
    ("sparsex (no hybrid)", {"method": "sparsex", "hybrid": False}),
    ("sparsex (hybrid)", {"method": "sparsex", "hybrid": True}),
    ("blend", {"method": "blend"}),
    ("blend (no shift)", {"method": "blend", "shift": 0.0}),
]


def rag_prompt(llm: Any, num_docs: int, doc_tokens: int, seed: int) -> tuple[list[Any], list[str]]:
    from sparsex import Segment
    from sparsex.lab.workloads import passages

    docs = []
    for text in passages(doc_tokens * 4, doc_tokens * 6, seed):
        toks = llm.tokenizer.encode(text)
        if len(toks) >= doc_tokens:
            docs.append(llm.tokenizer.decode(toks[:doc_tokens]))
        if len(docs) == num_docs:
            break
    order = list(reversed(range(len(docs))))
    prompt: list[Any] = ["Answer the question using the documents below.\n"]
    for i in order:
        prompt += [f"\nDocument {i + 1}:\n", Segment(docs[i])]
    prompt.append("\n\nQuestion: What is the main topic of the first document?\nAnswer:")
    return prompt, docs


def load_breakdown(llm: Any, prompt: list[Any], namespace: str, repeats: int) -> dict[str, float]:
    """Median seconds of the parts of ``naive``'s lookup + alignment on ``prompt``, and the floor.

    lookup: segment index lookup with token verification; load: copying every hit's V and rotating
    its K into the request's blocks; copy_floor: a plain copy of the same number of K and V rows
    into a buffer allocated once (the memory traffic any owned copy costs, with no rotation).
    """
    import time

    import torch

    from sparsex import SamplingParams
    from sparsex.cache import blocks_for_tokens
    from sparsex.kv.admission import auto_spans

    req = llm.add_request(prompt, SamplingParams(max_tokens=1), reuse={"method": "naive", "namespace": namespace})
    llm.abort(req)  # only its tokens and spans are needed
    ids, n = req.prompt_token_ids, len(req.prompt_token_ids)
    spans = list(req.spans) + auto_spans(n, ids, list(req.spans), namespace)
    store, kv, pool = llm.engine.store, llm.engine.kv, llm.engine.pool
    ns = req.reuse.namespace
    parts: dict[str, list[float]] = {"lookup": [], "load": [], "copy_floor": []}
    bufs: tuple[torch.Tensor, torch.Tensor] | None = None
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        t0 = time.perf_counter()
        _, prefix_blocks, hits = llm.engine.cache.lookup(ids, spans, ns, prefix=True, segments=True)
        t1 = time.perf_counter()
        table = prefix_blocks + pool.allocate(blocks_for_tokens(n, pool.block_size) - len(prefix_blocks))
        try:
            t2 = time.perf_counter()
            loaded, _ = store.load(hits, table)  # releases the hits' source blocks
            t3 = time.perf_counter()
        finally:
            pool.release(table)
        rows = int(loaded.numel())
        if bufs is None:  # allocated once: the warm-up round pages them in, as the pool's blocks are
            bufs = torch.empty_like(kv.k[:, :rows]), torch.empty_like(kv.v[:, :rows])
        k_buf, v_buf = bufs
        t4 = time.perf_counter()
        k_buf.copy_(kv.k[:, :rows])
        v_buf.copy_(kv.v[:, :rows])
        t5 = time.perf_counter()
        for name, dt in (("lookup", t1 - t0), ("load", t3 - t2), ("copy_floor", t5 - t4)):
            parts[name].append(dt)
    return {name: statistics.median(v[1:]) for name, v in parts.items()} | {"rows": float(rows)}


def main(argv: list[str] | None = None) -> int:
    if argv is not None and "--plain" in argv:  # plain-string prompts: sparsex.lab.bench.plain
        from sparsex.lab.bench import plain

        return plain.main([a for a in argv if a != "--plain"])
    ap = argparse.ArgumentParser(prog="sparsex bench reuse", description=__doc__,
                                 epilog="--plain: plain-string RAG prompts instead (see sparsex bench reuse --plain --help)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=512)
    ap.add_argument("--lengths", default="", help="also sweep total doc tokens, e.g. 1024,2048,4096 (plot)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=None, help="recompute budget (default: the model family's)")
    ap.add_argument("--methods", default="", help="comma-separated subset of the rows (default: all), e.g. none,naive")
    ap.add_argument("--kv-dtype", default="float32", help="KV storage dtype (float32, bfloat16, float16)")
    ap.add_argument("--out", default="out/bench_reuse.json")
    ap.add_argument("--plot", default="out/ttft_vs_length.png")
    args = ap.parse_args(argv)

    import torch

    from sparsex import LLM, SamplingParams
    from sparsex.lab.quality import kl_divergence

    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(wanted) - {label for label, _ in METHODS}
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; rows are: {', '.join(label for label, _ in METHODS)}")
    methods = [(label, opts) for label, opts in METHODS if not wanted or label in wanted or label == "none"]
    llm = LLM(model=args.model, kv_dtype=args.kv_dtype, max_prefill_tokens=None)  # full prefill unchunked
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    sizes = [args.docs * args.doc_tokens] + [int(x) for x in args.lengths.split(",") if x]
    all_rows: dict[int, list[dict[str, Any]]] = {}
    breakdown: dict[str, float] = {}
    for total in sizes:
        prompt, docs = rag_prompt(llm, args.docs, total // args.docs, seed=total)
        llm.cache_segments(docs, namespace=f"bench-{total}")
        times: dict[str, list[float]] = {label: [] for label, _ in methods}
        overheads: dict[str, list[float]] = {label: [] for label, _ in methods}
        last: dict[str, Any] = {}
        for _ in range(args.repeats):
            for label, opts in methods:  # interleaved so drift hits every method alike
                reuse = {**opts, "budget": args.budget, "register": False, "namespace": f"bench-{total}"}
                out = llm.generate([prompt], one, reuse=reuse)[0]
                times[label].append(out.metrics.ttft_s)
                overheads[label].append(out.metrics.reuse_overhead_s)
                last[label] = out.metrics
        base = statistics.median(times["none"])
        # Quality on the same prompt (untimed): KL of the first next-token distribution vs none.
        lps = {label: llm.next_token_logprobs(prompt, reuse={**opts, "budget": args.budget, "register": False,
                                                             "namespace": f"bench-{total}"})
               for label, opts in methods}
        ref = lps["none"]
        kls = {label: kl_divergence(torch.from_numpy(ref), torch.from_numpy(lp)) for label, lp in lps.items()}
        naive_kl = kls.get("naive")
        rows = []
        for label, _ in methods:
            m, t, ov = last[label], statistics.median(times[label]), statistics.median(overheads[label])
            rows.append({
                "kl": kls[label], "top1": bool(lps[label].argmax() == ref.argmax()),
                "gap_closed": 1.0 - kls[label] / naive_kl if naive_kl else None,
                "method": label, "ttft_s": t, "speedup": base / t, "cost": m.compute_fraction,
                "reused": m.num_segment_hit_tokens / m.num_prompt_tokens,
                "recomputed": m.num_recomputed_tokens / m.num_prompt_tokens,
                "overhead_s": ov, "overhead_share": ov / t,
                "prompt_tokens": m.num_prompt_tokens,
            })
        all_rows[total] = rows
        if total == sizes[0]:
            parts = load_breakdown(llm, prompt, f"bench-{total}", args.repeats)
            breakdown = {**parts, "naive_ttft_s": statistics.median(times["naive"])} if "naive" in times else parts
        print(f"\nRAG prompt: {rows[0]['prompt_tokens']} tokens, {args.docs} cached documents, "
              f"budget {'default' if args.budget is None else args.budget}, median of {args.repeats}")
        print_table(
            ["method", "TTFT s", "speedup", "cost", "reused", "recomputed", "lookup+align s", "share", "KL",
             "gap closed", "top1"],
            [[r["method"], r["ttft_s"], f"{r['speedup']:.1f}x", r["cost"], r["reused"], r["recomputed"],
              r["overhead_s"], f"{100 * r['overhead_share']:.1f}%", f"{r['kl']:.4f}",
              "-" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%", "yes" if r["top1"] else "no"]
             for r in rows],
        )
        if total == sizes[0]:
            ms = {k: f"{1e3 * breakdown[k]:.1f} ms" for k in ("lookup", "load", "copy_floor")}
            if "naive_ttft_s" in breakdown:
                for k in ms:
                    ms[k] += f" ({100 * breakdown[k] / breakdown['naive_ttft_s']:.1f}% of naive TTFT)"
            print(f"naive's lookup + alignment, median of {args.repeats} ({int(breakdown['rows'])} reused tokens, "
                  f"KV {args.kv_dtype}): lookup {ms['lookup']}; load = V copy + K rotation {ms['load']}; "
                  f"a plain copy of the same K and V {ms['copy_floor']}")
    write_json(args.out, {"machine": machine(), "model": llm.model_name, "args": vars(args),
                          "results": {str(k): v for k, v in all_rows.items()}, "load_breakdown": breakdown})
    if len(sizes) > 1 and args.plot:
        _plot(all_rows, [label for label, _ in methods], args.plot)
    return 0


def _plot(all_rows: dict[int, list[dict[str, Any]]], labels: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in labels:
        pts = sorted((rows[0]["prompt_tokens"], next(r["ttft_s"] for r in rows if r["method"] == label))
                     for rows in all_rows.values())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (s)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
