"""``sparsex bench layers``: which layers' KV errors matter for the first token of a reuse workload.

For each item, the reused positions get the true (full-prefill) KV in one set of layers and the
cached KV in the others; the last prompt token is rerun over that mix and compared with full
prefill. "Gap closed" = 1 - KL(mix) / KL(no layer true). Shows where a repair has to act.

With ``--late-start 0,3,8`` it asks instead whether caching each token's hidden state would make
repair cheaper: the recompute set joins the forward at layer m from the hidden state recorded when
its segment was cached (``quality.late_start_effect``); gap closed is against naive, with the cost.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from sparsex.lab.bench.common import machine, print_table, write_json


def layer_sets(num_layers: int, cuts: list[int], width: int) -> dict[str, list[int]]:
    """Named sets of layers: none, all, below / from each cut, and windows of ``width`` layers."""
    sets: dict[str, list[int]] = {"none": [], "all": list(range(num_layers))}
    for c in cuts:
        if 0 < c < num_layers:
            sets[f"<{c}"] = list(range(c))
            sets[f">={c}"] = list(range(c, num_layers))
    for a in range(0, num_layers, width):
        sets[f"[{a},{min(a + width, num_layers)})"] = list(range(a, min(a + width, num_layers)))
    return sets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sparsex bench layers", description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--workloads", default="rag,agents")
    ap.add_argument("--n", type=int, default=8, help="items per workload")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cuts", default="3,6,10,15,20,25", help="layer indices: true KV below / from each")
    ap.add_argument("--width", type=int, default=5, help="layers per window")
    ap.add_argument("--late-start", default="",
                    help="layers m, e.g. 0,3,8: run the hidden-state restart analysis instead")
    ap.add_argument("--out", default="out/bench_layers.json")
    args = ap.parse_args(argv)
    starts = [int(m) for m in args.late_start.split(",") if m.strip()]

    from sparsex import LLM
    from sparsex.lab.analysis import layer_kv_effect
    from sparsex.lab.oracle import LAB_PLANNERS
    from sparsex.lab.workloads import make_workload

    llm = LLM(model=args.model, planners=LAB_PLANNERS, max_prefill_tokens=None)  # exact, unchunked reference
    sets = layer_sets(llm.spec.num_layers, [int(c) for c in args.cuts.split(",") if c], args.width)
    report: dict[str, Any] = {"machine": machine(), "model": llm.model_name, "args": vars(args), "workloads": {}}
    for kind in args.workloads.split(","):
        items = make_workload(kind, args.n, args.seed, style="chatml")
        if starts:
            report["workloads"][kind] = _late_start(llm, kind, items, starts)
            continue
        kls: dict[str, list[float]] = {name: [] for name in sets}
        for i, item in enumerate(items):
            for name, kl in layer_kv_effect(llm, item, sets, namespace=f"layers-{kind}-{i}").items():
                kls[name].append(kl)
            print(f"  {kind} {i + 1}/{len(items)} done", flush=True)
        base = statistics.mean(kls["none"])
        rows = [[name, statistics.mean(v), 1.0 - statistics.mean(v) / base if base else 0.0] for name, v in kls.items()]
        print(f"\n== {kind}: true KV in layers ... (others cached) ==")
        print_table(["layers", "KL", "gap closed"], rows)
        report["workloads"][kind] = {name: {"kl": statistics.mean(v), "per_item": v} for name, v in kls.items()}
    write_json(args.out, report)
    return 0


def _late_start(llm: Any, kind: str, items: list[Any], starts: list[int]) -> dict[str, Any]:
    from sparsex.lab.analysis import late_start_effect

    runs: dict[str, list[tuple[float, float]]] = {}
    for i, item in enumerate(items):
        for name, kl_cost in late_start_effect(llm, item, starts, namespace=f"late-{kind}-{i}").items():
            runs.setdefault(name, []).append(kl_cost)
        print(f"  {kind} {i + 1}/{len(items)} done", flush=True)
    base = statistics.mean(kl for kl, _ in runs["naive"])
    rows = [[name, statistics.mean(kl for kl, _ in v), 1.0 - statistics.mean(kl for kl, _ in v) / base if base else 0.0,
             statistics.mean(c for _, c in v)] for name, v in runs.items()]
    print(f"\n== {kind}: recompute set restarted at layer m from its cached hidden state ==")
    print_table(["run", "KL", "gap closed", "cost"], rows)
    return {name: {"kl": statistics.mean(kl for kl, _ in v), "cost": statistics.mean(c for _, c in v),
                   "per_item": v} for name, v in runs.items()}
