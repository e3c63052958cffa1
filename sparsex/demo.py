"""``sparsex demo``: load the default model and show what the engine does."""

from __future__ import annotations

import time


def run_demo(model: str | None = None, device: str = "cpu", quick: bool = False) -> int:
    from sparsex import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model, device=device)
    print(f"model {llm.model_name} loaded in {time.perf_counter() - t0:.1f}s "
          f"({llm.spec.num_layers} layers, KV pool {llm.engine.pool.num_blocks} blocks of {llm.engine.pool.block_size})")
    params = SamplingParams(max_tokens=24 if quick else 48, temperature=0.0)
    out = llm.chat([{"role": "user", "content": "In one sentence, what is a KV cache?"}], params)
    m = out.metrics
    print(f"\nassistant> {out.text.strip()}\n")
    print(f"TTFT {m.ttft_s * 1e3:.0f} ms, {m.num_generated_tokens} tokens in {m.latency_s:.2f}s")
    try:
        from sparsex.lab.scenarios import run_scenarios
    except ImportError:
        return 0
    return int(run_scenarios(llm, quick=quick))
