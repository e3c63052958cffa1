"""``sparsex bench serve --open-loop``: TTFT per tenant and prompt class under Poisson arrivals.

    sparsex bench serve --open-loop --streams a:long:0.03,a:short:0.3,b:short:0.6 --scales 0.5,1 \\
        --chunks 512,0 --duration 180

Open loop: every request is sent at its arrival time, whether or not earlier ones have finished,
so queueing is what gets measured (a closed loop, one request after another, never queues). Each
stream ``tenant:class:rate`` is a Poisson process of ``rate`` requests per second (seeded); tenant
``a`` and ``b`` each have their own API key, so the server shares the engine between them.
Every run (each ``--scales`` factor on every rate, times each ``--chunks`` setting of
``max_prefill_tokens``, 0 = unchunked) gets a fresh engine and server, sends arrivals for
``--duration`` seconds, then waits up to ``--drain-timeout`` for the rest.

Reported per run and (tenant, class): n sent, n answered, 429s and other failures, TTFT (from the
arrival, so client and server queueing count) p50 / p90 / p99 -- shown only where n is large enough
for the percentile not to be the maximum -- and the max, the longest wait. Prompts: ``load.py``.
"""

from __future__ import annotations

import argparse
import random
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any

from sparsex.lab.bench.common import latency_summary, machine, print_table, write_json
from sparsex.lab.bench.load import Prompts, Sent, add_server_arguments, clients, send, serving


@dataclass(frozen=True)
class Stream:
    """A Poisson arrival stream: ``rate`` requests per second of one tenant and prompt class."""

    tenant: str
    kind: str
    rate: float


def parse_streams(text: str) -> list[Stream]:
    """``a:long:0.03,b:short:0.6`` -> streams; tenants ``a`` / ``b``, classes short / long / fresh."""
    out = []
    for item in text.split(","):
        tenant, kind, rate = item.strip().split(":")
        if tenant not in ("a", "b") or kind not in ("short", "long", "fresh") or float(rate) <= 0:
            raise ValueError(f"bad stream {item!r}: expected tenant(a|b):class(short|long|fresh):rate>0")
        out.append(Stream(tenant, kind, float(rate)))
    return out


def arrivals(streams: list[Stream], scale: float, duration_s: float, seed: int) -> list[Sent]:
    """Every request of the run, in arrival order: exponential gaps per stream (seeded)."""
    out = []
    for i, s in enumerate(streams):
        rng = random.Random(f"sparsex-openloop:{seed}:{i}")
        t = rng.expovariate(s.rate * scale)
        while t < duration_s:
            out.append(Sent(s.tenant, s.kind, t))
            t += rng.expovariate(s.rate * scale)
    return sorted(out, key=lambda r: r.arrival_s)


def run(args: argparse.Namespace, streams: list[Stream], scale: float, chunk: int) -> dict[str, Any]:
    """One run on a fresh engine; its summary with every request."""
    plan = arrivals(streams, scale, args.duration, args.seed)
    prompts = Prompts(args)
    rng = random.Random(f"sparsex-openloop-prompts:{args.seed}")
    messages = [prompts.messages(r.kind, rng) for r in plan]
    with serving(args, chunk or None) as (llm, base_url):
        tenants = clients(base_url)
        model = tenants["a"].models.list().data[0].id
        tenants["a"].completions.create(model=model, prompt="warm up", max_tokens=2)
        pool = ThreadPoolExecutor(args.max_inflight)
        try:
            t0 = time.perf_counter()
            futures = []
            for sent, msgs in zip(plan, messages, strict=True):
                time.sleep(max(0.0, t0 + sent.arrival_s - time.perf_counter()))
                futures.append(pool.submit(send, tenants[sent.tenant], model, msgs, sent, t0, args))
            wait(futures, timeout=args.drain_timeout)
            wall = time.perf_counter() - t0
        finally:  # requests still running past the drain timeout are cut: they count as failed
            for c in tenants.values():
                c.close()
            pool.shutdown(wait=True, cancel_futures=True)
    return {"scale": scale, "max_prefill_tokens": chunk or None, "wall_s": wall,
            "rows": summarize(plan), "requests": [asdict(r) for r in plan]}


def summarize(sent: list[Sent]) -> list[dict[str, Any]]:
    """One row per (tenant, class), then one for everything."""
    groups: dict[tuple[str, str], list[Sent]] = {}
    for r in sent:
        groups.setdefault((r.tenant, r.kind), []).append(r)
    rows = []
    for (tenant, kind), rs in [*sorted(groups.items()), (("all", "all"), sent)]:
        ttft = [r.ttft_s for r in rs if r.ttft_s is not None]
        rows.append({"tenant": tenant, "kind": kind, "sent": len(rs), "answered": len(ttft),
                     "rejected_429": sum(r.status == 429 for r in rs),
                     "failed": sum(r.ttft_s is None and r.status != 429 for r in rs),
                     "ttft_s": latency_summary(ttft),
                     "send_lag_max_s": max((r.send_lag_s for r in rs), default=0.0)})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparsex bench serve --open-loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(p)
    p.add_argument("--streams", type=parse_streams, default=parse_streams("a:long:0.03,a:short:0.3,b:short:0.6"),
                   help="tenant:class:rate (requests/s) Poisson streams, comma-separated")
    p.add_argument("--scales", default="0.5,1", help="factors on every rate: one run per factor (and chunk)")
    p.add_argument("--chunks", default="512,0", help="max_prefill_tokens per run (0 = unchunked)")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of arrivals per run")
    p.add_argument("--drain-timeout", type=float, default=900.0, help="seconds to wait for the rest")
    p.add_argument("--max-inflight", type=int, default=512, help="client threads / connections")
    p.add_argument("--out", default="out/bench_openloop.json")
    p.add_argument("--plot", default=None, help="write a TTFT plot (PNG) here")
    args = p.parse_args(argv)
    args.scale_list = [float(x) for x in args.scales.split(",")]
    args.chunk_list = [int(x) for x in args.chunks.split(",")]
    if args.duration <= 0 or min(args.scale_list) <= 0 or min(args.chunk_list) < 0:
        p.error("--duration and --scales must be positive, --chunks >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = [run(args, args.streams, scale, chunk) for scale in args.scale_list for chunk in args.chunk_list]
    rates = ", ".join(f"{s.tenant}:{s.kind} {s.rate:g}/s" for s in args.streams)
    print(f"\nopen loop, Poisson arrivals ({rates}) x scale, {args.duration:g} s each, reuse={args.reuse}")
    headers = ["scale", "chunk", "tenant", "class", "sent", "answered", "429", "failed", "TTFT p50 s", "p90 s",
               "p99 s", "max s"]
    table = []
    for r in runs:
        for row in r["rows"]:
            t = row["ttft_s"]
            table.append([r["scale"], r["max_prefill_tokens"] or "off", row["tenant"], row["kind"], row["sent"],
                          row["answered"], row["rejected_429"], row["failed"], t["p50"], t["p90"], t["p99"], t["max"]])
    print_table(headers, table)
    print("(p50/p90/p99 are '-' where n is too small for them to differ from the max; max = the longest wait)")
    write_json(args.out, {"config": {k: v for k, v in vars(args).items() if k not in ("out", "streams")},
                          "streams": [asdict(s) for s in args.streams], "machine": machine(), "runs": runs})
    if args.plot:
        plot(runs, args.plot)
    return 0


def plot(runs: list[dict[str, Any]], path: str) -> None:
    """TTFT of every answered request against its arrival time, one panel per run, a colour per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.6), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], runs, strict=True):
        groups: dict[str, list[dict[str, Any]]] = {}
        for q in r["requests"]:
            if q["ttft_s"] is not None:
                groups.setdefault(f"{q['tenant']}:{q['kind']}", []).append(q)
        for name, qs in sorted(groups.items()):
            ax.scatter([q["arrival_s"] for q in qs], [q["ttft_s"] for q in qs], s=8, label=name)
        ax.set_title(f"x{r['scale']:g}, chunk {r['max_prefill_tokens'] or 'off'}")
        ax.set_xlabel("arrival (s)")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("TTFT from arrival (s)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
