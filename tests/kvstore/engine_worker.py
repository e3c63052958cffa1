"""One engine process for the tier tests: ``python -m tests.kvstore.engine_worker job.json out.json``.

The job names the model folder, the ``LLM`` keyword arguments and a list of steps; the worker runs
them in order, writes one result per step to ``out.json``, then closes the engine (flushing its
store writes), as a replica would on a clean shutdown.

Steps:
  {"op": "generate", "prompt": [str | {"segment": [ids], "namespace": ns}], "reuse": ..., "max_tokens": n}
      -> {"token_ids", "num_segment_hit_tokens", "num_recomputed_tokens", "num_promoted"}
  {"op": "dump", "tokens": [ids], "namespace": ns, "out": path}   the pool's K/V of a cached segment
      -> {"num_tokens"} (0 when the pool does not hold all of it); K/V saved with torch.save
  {"op": "pin", "docs": [[ids]], "namespace": ns}                 -> {"segment_ids"}
  {"op": "segments"}                                               -> {"segments"} (list_segments)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from sparsex import LLM, SamplingParams, Segment


def prompt_of(parts: list[Any]) -> list[Any]:
    return [Segment(p["segment"], p.get("namespace", "")) if isinstance(p, dict) else p for p in parts]


def dump(llm: LLM, tokens: list[int], namespace: str, out: str) -> dict[str, Any]:
    """Save K/V [L, T, H, D] of a cached segment as the pool holds it (references given back)."""
    hit = llm.engine.cache.segments.match(tokens, namespace)
    try:
        if hit.num_tokens < len(tokens):
            return {"num_tokens": 0}
        bs = llm.engine.pool.block_size
        j = torch.arange(len(tokens))
        slots = torch.tensor(hit.block_ids)[j // bs] * bs + j % bs
        torch.save({"k": llm.engine.kv.k[:, slots].cpu(), "v": llm.engine.kv.v[:, slots].cpu(),
                    "positions": hit.positions}, out)
        return {"num_tokens": hit.num_tokens}
    finally:
        llm.engine.pool.release(hit.block_ids)


def run_step(llm: LLM, step: dict[str, Any]) -> dict[str, Any]:
    op = step["op"]
    if op == "generate":
        params = SamplingParams(max_tokens=step.get("max_tokens", 8), temperature=0.0, ignore_eos=True)
        before = llm.engine.tiers.stats.num_promoted if llm.engine.tiers is not None else 0
        out = llm.generate([prompt_of(step["prompt"])], params, reuse=step.get("reuse"))[0]
        after = llm.engine.tiers.stats.num_promoted if llm.engine.tiers is not None else 0
        return {"token_ids": out.token_ids, "num_segment_hit_tokens": out.metrics.num_segment_hit_tokens,
                "num_recomputed_tokens": out.metrics.num_recomputed_tokens, "num_promoted": after - before}
    if op == "dump":
        return dump(llm, step["tokens"], step.get("namespace", ""), step["out"])
    if op == "pin":
        return {"segment_ids": llm.cache_segments(step["docs"], step.get("namespace", ""))}
    if op == "segments":
        return {"segments": llm.list_segments()}
    raise ValueError(f"unknown step {op!r}")


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    with LLM(model=job["model"], **job.get("llm", {})) as llm:
        results = [run_step(llm, step) for step in job["steps"]]
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
