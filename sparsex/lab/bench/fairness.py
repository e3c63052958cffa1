"""``sparsex bench serve --fairness``: TTFT of short requests while long prompts prefill, with and
without chunked prefill, side by side in one run.

Each setting gets a fresh engine and server on a free loopback port. One client thread sends
``--long`` long completions one after another (``--long-tokens`` prompt tokens each, full prefill:
reuse ``none``, so nothing is cached); short completions (a few prompt tokens,
``--short-max-tokens`` streamed) are sent every ``--interval`` seconds whether or not the earlier
ones have finished (open loop: they queue behind the long prefills and behind each other), until
the long ones are done. Reported per setting: the short requests' number n and TTFT p50 / p90 /
p99 -- each only when n is large enough for it not to be the maximum (a p99 needs 100) -- and max,
the long requests' mean TTFT, and the wall time. For two tenants and Poisson arrivals, see
``--open-loop``.
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sparsex.lab.bench.common import latency_summary, machine, print_table, write_json


def long_prompt(llm: Any, tokens: int, seed: int) -> list[int]:
    from sparsex.lab.workloads import passages

    ids: list[int] = []
    for text in passages(2000, 4000, seed):
        ids += llm.tokenizer.encode(text)
        if len(ids) >= tokens:
            return ids[:tokens]
    raise ValueError(f"the corpus is shorter than {tokens} tokens")


def run_setting(args: argparse.Namespace, chunk: int | None) -> dict[str, Any]:
    import openai

    from sparsex import LLM
    from sparsex.server.app import create_app
    from sparsex.server.background import BackgroundServer

    llm = LLM(model=args.model, max_prefill_tokens=chunk)
    prompts = [long_prompt(llm, args.long_tokens, seed) for seed in range(args.long)]
    short_ttft: list[float] = []
    long_ttft: list[float] = []
    done = threading.Event()
    with BackgroundServer(create_app(llm, max_queue=256, default_max_tokens=16)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=3600)
        model = client.models.list().data[0].id
        client.completions.create(model=model, prompt="warm up", max_tokens=2)

        def longs() -> None:
            try:
                for ids in prompts:
                    t0 = time.perf_counter()
                    client.completions.create(model=model, prompt=ids, max_tokens=2,
                                              extra_body={"sparsex": {"reuse": "none"}})
                    long_ttft.append(time.perf_counter() - t0)
            finally:
                done.set()

        def ttft_of_short(i: int, due: float) -> None:
            stream = client.completions.create(model=model, prompt=f"Say hello {i}.", stream=True,
                                               max_tokens=args.short_max_tokens, temperature=0)
            first = None
            for _ in stream:
                first = first or time.perf_counter()
            with lock:
                short_ttft.append((first or time.perf_counter()) - due)

        lock = threading.Lock()
        t_start = time.perf_counter()
        worker = threading.Thread(target=longs)
        worker.start()
        with ThreadPoolExecutor(args.max_short) as pool:
            for i in range(args.max_short):  # every interval, finished or not: queueing is sampled
                due = t_start + i * args.interval
                if done.wait(max(0.0, due - time.perf_counter())):
                    break
                pool.submit(ttft_of_short, i, due)
        worker.join()
        wall = time.perf_counter() - t_start
        client.close()
    return {
        "chunked_prefill": chunk, "num_short": len(short_ttft), "num_long": len(long_ttft),
        "short_ttft": latency_summary(short_ttft), "long_ttft_mean_s": sum(long_ttft) / max(1, len(long_ttft)),
        "wall_s": wall, "short_ttft_s": short_ttft,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sparsex bench serve --fairness", description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--long", type=int, default=3, help="long prompts, sent one after another")
    ap.add_argument("--long-tokens", type=int, default=6000)
    ap.add_argument("--chunk", type=int, default=512, help="max_prefill_tokens of the chunked setting")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between short requests")
    ap.add_argument("--short-max-tokens", type=int, default=4)
    ap.add_argument("--max-short", type=int, default=400, help="bound on short requests per setting (and on "
                    "client threads)")
    ap.add_argument("--out", default="out/bench_fairness.json")
    args = ap.parse_args(argv)
    runs = [run_setting(args, None), run_setting(args, args.chunk)]
    print(f"\nshort requests while {args.long} prompts of {args.long_tokens} tokens prefill (full prefill)")
    def ms(v: float | None) -> float | None:
        return None if v is None else 1e3 * v

    print_table(
        ["chunked prefill", "short n", "TTFT p50 ms", "p90 ms", "p99 ms", "max ms", "long TTFT s", "wall s"],
        [["off" if r["chunked_prefill"] is None else f"{r['chunked_prefill']} tokens", r["num_short"],
          ms(r["short_ttft"]["p50"]), ms(r["short_ttft"]["p90"]), ms(r["short_ttft"]["p99"]),
          ms(r["short_ttft"]["max"]), r["long_ttft_mean_s"], r["wall_s"]] for r in runs],
    )
    print("(short TTFT from each request's due time; p50/p90/p99 are '-' where n is too small for them "
          "to differ from the max)")
    write_json(args.out, {"machine": machine(), "args": vars(args), "runs": runs})
    return 0
