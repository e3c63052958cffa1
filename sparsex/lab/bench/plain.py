"""``sparsex bench reuse --plain``: reuse on plain-string RAG prompts (no annotated segments).

Per prompt length: documents of real text are pasted into one string behind an instruction and
before a question and served once (full prefill, which caches content-defined chunks); then the
same documents come back reordered, then with half of them replaced by new ones. For each phase,
``none``, ``naive`` and the default method run side by side (interleaved, median of repeats), each
with the share of document tokens found in cache, its TTFT and speed-up over ``none``, and its
quality against ``none`` on the same prompt: KL of the first next-token distribution, same top-1
token, and the greedy continuation's matching length out of ``--match``.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from sparsex.lab.bench.common import machine, print_table, write_json

INSTRUCTION = "Answer the question using only the documents below.\n\n"
QUESTION = "\n\nQuestion: Which document explains the main idea, and what is it?\nAnswer:"


def documents(llm: Any, num_docs: int, doc_tokens: int, seed: int) -> list[str]:
    """``num_docs`` distinct passages of real text, each cut to about ``doc_tokens`` tokens."""
    from sparsex.lab.workloads import passages

    docs: list[str] = []
    for text in passages(doc_tokens * 4, doc_tokens * 8, seed):
        toks = llm.tokenizer.encode(text)
        if len(toks) < doc_tokens:
            continue
        doc = llm.tokenizer.decode(toks[:doc_tokens]).strip()
        if doc not in docs:  # the corpus repeats a few paragraphs
            docs.append(doc)
        if len(docs) == num_docs:
            return docs
    raise ValueError(f"the corpus has fewer than {num_docs} passages of {doc_tokens} tokens")


def plain_prompt(docs: list[str]) -> str:
    """The usual RAG framework prompt: every document pasted into one string."""
    body = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
    return INSTRUCTION + body + QUESTION


def document_positions(llm: Any, prompt: str, cached: list[str]) -> set[int]:
    """Prompt positions of tokens that lie inside one of the ``cached`` documents' text (by the
    tokenizer's character offsets; BOS, if the model adds one, shifts them by one)."""
    enc = llm.tokenizer.hf.encode(prompt, add_special_tokens=False)
    shift = len(llm.tokenizer.with_bos([]))
    spans = []
    for d in cached:
        at = prompt.index(d)
        spans.append((at, at + len(d)))
    return {i + shift for i, (a, b) in enumerate(enc.offsets) if any(s <= a and b <= e for s, e in spans)}


def first_output(llm: Any, prompt: str, reuse: dict[str, Any]) -> Any:
    """One untimed request that keeps its first-token data: the next-token log-probabilities and
    the prompt positions the prefill recomputed (``naive`` recomputes exactly what it did not find)."""
    from sparsex import SamplingParams

    req = llm.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                          reuse=reuse, keep_first_logits=True)
    return llm.run_to_completion([req])[0]


def phases(docs: list[str], fresh: list[str]) -> dict[str, list[str]]:
    """The prompts after the first: the same documents reordered, then half replaced by new ones."""
    k = len(docs)
    reordered = [docs[i] for i in range(k - 1, -1, -1)]
    replaced = [fresh[i // 2] if i % 2 else docs[(i * 3) % k] for i in range(k)]
    return {"reordered": reordered, "half replaced": replaced}


def run_length(llm: Any, total: int, args: argparse.Namespace, methods: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    import torch

    from sparsex import SamplingParams
    from sparsex.lab.quality import kl_divergence

    per_doc = total // args.docs
    pool = documents(llm, args.docs + args.docs // 2, per_doc, seed=total)
    docs, fresh = pool[: args.docs], pool[args.docs :]
    ns = f"plain-{total}"
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    greedy = SamplingParams(max_tokens=args.match, temperature=0.0, ignore_eos=True)
    llm.generate(plain_prompt(docs), one, reuse={"method": "none", "namespace": ns})  # served once
    rows = []
    for phase, order in phases(docs, fresh).items():
        prompt = plain_prompt(order)
        doc_pos = document_positions(llm, prompt, [d for d in order if d in docs])
        times: dict[str, list[float]] = {label: [] for label, _ in methods}
        lookups: dict[str, list[float]] = {label: [] for label, _ in methods}
        loads: dict[str, list[float]] = {label: [] for label, _ in methods}
        last: dict[str, Any] = {}
        for _ in range(args.repeats):
            for label, opts in methods:  # interleaved so drift hits every method alike
                out = llm.generate(prompt, one, reuse={**opts, "register": False, "namespace": ns})[0]
                times[label].append(out.metrics.ttft_s)
                lookups[label].append(out.metrics.lookup_s)
                loads[label].append(out.metrics.load_s)
                last[label] = out.metrics
        firsts = {label: first_output(llm, prompt, {**opts, "register": False, "namespace": ns})
                  for label, opts in methods}
        lps = {label: out.first_logprobs for label, out in firsts.items()}
        found_docs = len(doc_pos - {int(p) for p in firsts["naive"].recomputed_positions})
        conts = {label: llm.generate(prompt, greedy, reuse={**opts, "register": False, "namespace": ns})[0].token_ids
                 for label, opts in methods}
        ref, base = lps["none"], statistics.median(times["none"])
        kls = {label: kl_divergence(torch.from_numpy(ref), torch.from_numpy(lp)) for label, lp in lps.items()}
        for label, _ in methods:
            m, t = last[label], statistics.median(times[label])
            match = 0
            for a, b in zip(conts[label], conts["none"], strict=False):
                if a != b:
                    break
                match += 1
            rows.append({
                "length": total, "phase": phase, "method": label, "prompt_tokens": m.num_prompt_tokens,
                "doc_tokens": len(doc_pos), "found": 0 if label == "none" else found_docs,
                "found_share": 0.0 if label == "none" else found_docs / max(1, len(doc_pos)),
                "hit_tokens": m.num_segment_hit_tokens + m.num_prefix_hit_tokens,
                "runs": m.num_reused_runs, "seam_lost": m.num_seam_lost_tokens,
                "ttft_s": t, "speedup": base / t, "cost": m.compute_fraction,
                "lookup_s": statistics.median(lookups[label]), "load_s": statistics.median(loads[label]),
                "overhead_s": statistics.median(a + b for a, b in zip(lookups[label], loads[label], strict=True)),
                "overhead_share": statistics.median(
                    (a + b) / tt for a, b, tt in zip(lookups[label], loads[label], times[label], strict=True)),
                "kl": kls[label], "gap_closed": (1.0 - kls[label] / kls["naive"]) if kls.get("naive") else None,
                "top1": bool(lps[label].argmax() == ref.argmax()), f"match{args.match}": match,
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sparsex bench reuse --plain", description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", default="2048,4096,8192", help="total document tokens per prompt")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--match", type=int, default=16, help="greedy tokens compared with none")
    ap.add_argument("--method", default="blend", help="the default method's row (besides none and naive)")
    ap.add_argument("--out", default="out/bench_plain.json")
    ap.add_argument("--plot", default="out/plain_reuse.png")
    args = ap.parse_args(argv)

    from sparsex import LLM

    llm = LLM(model=args.model, max_prefill_tokens=None)  # full prefill unchunked: the fair baseline
    methods = [("none", {"method": "none"}), ("naive", {"method": "naive"}), (args.method, {"method": args.method})]
    rows: list[dict[str, Any]] = []
    for total in [int(x) for x in args.lengths.split(",") if x]:
        length_rows = run_length(llm, total, args, methods)
        rows += length_rows
        print(f"\nplain-string RAG, {args.docs} documents, {total} document tokens, median of {args.repeats}")
        print_table(
            ["phase", "method", "tokens", "found", "runs", "seam lost", "TTFT s", "speedup", "lookup ms", "load ms",
             "of TTFT", "cost", "KL", "gap closed", "top1", f"match/{args.match}"],
            [[r["phase"], r["method"], r["prompt_tokens"], f"{100 * r['found_share']:.1f}%", r["runs"], r["seam_lost"],
              r["ttft_s"], f"{r['speedup']:.1f}x", f"{1000 * r['lookup_s']:.1f}", f"{1000 * r['load_s']:.1f}",
              f"{100 * r['overhead_share']:.1f}%", r["cost"], f"{r['kl']:.4f}",
              "-" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%", "yes" if r["top1"] else "no",
              r[f"match{args.match}"]] for r in length_rows],
        )
    write_json(args.out, {"machine": machine(), "model": llm.model_name, "args": vars(args), "rows": rows})
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (phase, style) in (("reordered", "-"), ("half replaced", "--")):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["prompt_tokens"], r["ttft_s"]) for r in rows if r["phase"] == phase and r["method"] == method)
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{method}, {phase}")
        pts = sorted((r["prompt_tokens"], 100 * r["found_share"]) for r in rows if r["phase"] == phase and r["method"] == "naive")
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=phase)
    axes[0].set(xlabel="prompt tokens", ylabel="TTFT (s)", yscale="log", title="time to first token")
    axes[1].set(xlabel="prompt tokens", ylabel="% of cached document tokens found", ylim=(0, 105),
                title="found in cache")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
