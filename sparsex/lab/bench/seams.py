"""``sparsex bench seams``: how much of a real benchmark's reusable text the cache finds, and what it loses.

Per item of a real workload (``musique``: each passage served alone first, then all ten pasted into
one plain prompt; ``locomo``: sessions served alone or in the running conversation, then
re-inserted), the warm-up prompts are served with each ``--warm`` method as a client would send them
(registration on), then the test prompt runs with ``naive`` (it recomputes exactly what it did not
find) and with ``none`` (full prefill), side by side. Reported per workload and warm-up method:

- found: the share of the test prompt's reusable tokens (those inside a 16-token run that also
  occurs in a warm-up prompt, the most any lookup could find) that were served from cache;
- lost at seams: reusable tokens not found in pieces shorter than a block next to found text
  (tokenization at a boundary, a run cut short); lost in runs: longer reusable pieces not found
  (not registered, evicted);
- naive TTFT / full: ``naive``'s time to first token over full prefill's on the same prompt.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from sparsex.lab.bench.common import machine, print_table, write_json

SEAM = 16
"""Lost pieces shorter than this (one block) next to found text count as seam losses."""


def classify_lost(reusable: list[bool], found: list[bool], seam: int = SEAM) -> tuple[int, int]:
    """(tokens lost at seams, tokens lost in longer runs): maximal runs of reusable positions that
    were not found, short ones next to a found position counted as seams."""
    at_seams = in_runs = 0
    i, n = 0, len(reusable)
    while i < n:
        if not reusable[i] or found[i]:
            i += 1
            continue
        j = i
        while j < n and reusable[j] and not found[j]:
            j += 1
        touches = (i > 0 and found[i - 1]) or (j < n and found[j])
        if j - i < seam and touches:
            at_seams += j - i
        else:
            in_runs += j - i
        i = j
    return at_seams, in_runs


def run_item(llm: Any, item: Any, warm: dict[str, Any], namespace: str) -> dict[str, Any]:
    from sparsex import SamplingParams
    from sparsex.lab.quality import reusable_mask, to_parts

    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    warm_ids = []
    for w in item.warmup:
        parts = to_parts(llm, w)
        warm_ids.append(llm.tokenizer.encode_prompt(parts)[0])
        llm.generate([parts], one, reuse={**warm, "namespace": namespace})
    prompt = to_parts(llm, item.prompt)
    full = llm.generate([prompt], one, reuse={"method": "none", "register": False, "namespace": namespace})[0]
    req = llm.add_request(prompt, one, reuse={"method": "naive", "register": False, "namespace": namespace},
                          keep_first_logits=True)
    naive = llm.run_to_completion([req])[0]
    ids = naive.prompt_token_ids
    recomputed = {int(p) for p in naive.recomputed_positions}
    found = [p not in recomputed for p in range(len(ids))]
    reusable = reusable_mask(ids, warm_ids)
    num_reusable = sum(reusable)
    num_found = sum(r and f for r, f in zip(reusable, found, strict=True))
    seams, runs = classify_lost(reusable, found)
    return {"item": item.name, "kind": item.kind, "prompt_tokens": len(ids), "reusable": num_reusable,
            "found": num_found, "found_share": num_found / num_reusable if num_reusable else None,
            "lost_at_seams": seams, "lost_in_runs": runs, "runs": naive.metrics.num_reused_runs,
            "naive_ttft_s": naive.metrics.ttft_s, "full_ttft_s": full.metrics.ttft_s,
            "naive_ttft_ratio": naive.metrics.ttft_s / full.metrics.ttft_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sparsex bench seams", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", required=True, help="folder with musique_s.json and locomo.json")
    ap.add_argument("--workloads", default="musique,locomo")
    ap.add_argument("--split", default="tune", choices=["tune", "report"])
    ap.add_argument("--n", type=int, default=8, help="items per workload")
    ap.add_argument("--warm", default="none,naive,blend",
                    help="comma-separated methods serving the warm-up prompts (options after ':' joined by '+')")
    ap.add_argument("--out", default="out/bench_seams.json")
    args = ap.parse_args(argv)

    from sparsex import LLM
    from sparsex.lab.quality import parse_method
    from sparsex.lab.stats import bootstrap_interval, mean_of
    from sparsex.lab.workloads.real import real_workload

    llm = LLM(model=args.model, max_prefill_tokens=None)
    rows, per_item = [], []
    for kind in args.workloads.split(","):
        items = real_workload(kind, args.data, args.split, args.n, count_tokens=lambda t: len(llm.tokenizer.encode(t)))
        for warm_text in args.warm.split(","):
            warm = parse_method(warm_text.replace("+", ",")).reuse
            runs = [run_item(llm, item, warm, f"seams-{kind}-{warm_text}-{i}") for i, item in enumerate(items)]
            per_item += [{**r, "warm": warm_text} for r in runs]
            shares = [r["found_share"] for r in runs if r["found_share"] is not None]
            ci = bootstrap_interval(len(shares), mean_of(shares), seed=f"seams:{kind}:{warm_text}")
            rows.append({
                "kind": kind, "warm": warm_text, "n": len(runs),
                "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in runs),
                "reusable": statistics.mean(r["reusable"] for r in runs),
                "found_share": statistics.mean(shares), "found_ci": ci, "min_found_share": min(shares),
                "lost_at_seams": statistics.mean(r["lost_at_seams"] for r in runs),
                "lost_in_runs": statistics.mean(r["lost_in_runs"] for r in runs),
                "naive_ttft_ratio": statistics.median(r["naive_ttft_ratio"] for r in runs),
            })
            print(f"  {kind} warm={warm_text} done", flush=True)
    print(f"\nfound share of reusable tokens, {args.split} split, {llm.model_name}")
    print_table(
        ["workload", "warm-up", "n", "prompt tokens", "reusable", "found", "[95% CI]", "min", "lost at seams",
         "lost in runs", "naive TTFT/full"],
        [[r["kind"], r["warm"], r["n"], f"{r['prompt_tokens']:.0f}", f"{r['reusable']:.0f}",
          f"{100 * r['found_share']:.1f}%",
          "-" if r["found_ci"] is None else f"[{100 * r['found_ci'][0]:.1f}, {100 * r['found_ci'][1]:.1f}]",
          f"{100 * r['min_found_share']:.1f}%", f"{r['lost_at_seams']:.1f}", f"{r['lost_in_runs']:.1f}",
          f"{r['naive_ttft_ratio']:.3f}"] for r in rows],
    )
    write_json(args.out, {"machine": machine(), "model": llm.model_name, "args": vars(args), "rows": rows,
                          "items": per_item})
    return 0
