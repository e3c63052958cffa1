"""``sparsex bench prefill``: full prefill and decode speed, this engine vs transformers, one run."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from sparsex.lab.bench.common import interleaved_medians, machine, print_table, write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sparsex bench prefill")
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", default="512,1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", default="out/bench_prefill.json")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from sparsex import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=args.model, max_prefill_tokens=None)  # full prefill unchunked, as transformers runs it
    load_s = time.perf_counter() - t0
    ref: Any = AutoModelForCausalLM.from_pretrained(str(llm.engine.model_path), dtype=torch.float32)
    ref.eval()
    gen = torch.Generator().manual_seed(0)
    rows, results = [], []
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    full = {"method": "none", "register": False}  # no cache hits between repeats
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(10, 20000, (n,), generator=gen)

        def ours(ids: torch.Tensor = ids) -> None:
            llm.generate(ids.tolist(), one, reuse=full)

        def theirs(ids: torch.Tensor = ids) -> None:
            with torch.inference_mode():
                ref(ids[None], logits_to_keep=1)

        t_ours, t_ref = interleaved_medians(ours, theirs, args.repeats)
        rows.append([n, t_ours, t_ref, t_ours / t_ref, n / t_ours, n / t_ref])
        results.append({"tokens": n, "sparsex_s": t_ours, "transformers_s": t_ref, "ratio": t_ours / t_ref})
        print(f"  {n} tokens: sparsex {t_ours:.3f}s, transformers {t_ref:.3f}s", flush=True)

    # Decode: tokens/s after a 256-token prompt, greedy.
    k = args.decode_tokens
    ids = torch.randint(10, 20000, (256,), generator=gen)
    params = SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True)

    def ours_decode() -> float:
        out = llm.generate(ids.tolist(), params, reuse=full)[0]
        return float((k - 1) / (out.metrics.latency_s - out.metrics.ttft_s))

    def ref_decode() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            ref.generate(ids[None], max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            ref.generate(ids[None], max_new_tokens=k, min_new_tokens=k, do_sample=False)
            t2 = time.perf_counter()
        return float((k - 1) / ((t2 - t1) - (t1 - t0)))

    ours_decode(), ref_decode()  # warm-up
    d_ours = sorted(ours_decode() for _ in range(args.repeats))[args.repeats // 2]
    d_ref = sorted(ref_decode() for _ in range(args.repeats))[args.repeats // 2]

    print(f"\nmodel {llm.model_name}, load {load_s:.2f}s (this process)")
    print_table(["tokens", "sparsex s", "transformers s", "ratio", "sparsex tok/s", "transformers tok/s"], rows)
    print(f"\ndecode tok/s (256-token prompt, {k} tokens): sparsex {d_ours:.1f}, transformers {d_ref:.1f}, "
          f"ratio {d_ours / d_ref:.2f}")
    write_json(args.out, {
        "machine": machine(), "model": llm.model_name, "load_s": load_s, "prefill": results,
        "decode": {"sparsex_tok_s": d_ours, "transformers_tok_s": d_ref, "ratio": d_ours / d_ref},
    })
    return 0
