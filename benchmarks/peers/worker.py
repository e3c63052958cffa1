"""One engine of the peer comparison, in its own process: runs a plan's prompts, writes the times.

Run by ``run.py`` with the engine's own Python (vLLM lives in a separate venv), so this file imports
only the standard library at module level; each engine imports its library when it is built.

    python worker.py ENGINE PLAN.json OUT.json [--method M] [--repeats N] [--vllm-dtype D]

ENGINE is ``transformers``, ``vllm`` or ``sparsex``. TTFT is the wall time of one request for one
token (``max_tokens=1``, greedy), tokenization included, measured the same way for every engine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any


class Transformers:
    """HF transformers, fp32: one forward pass over the prompt (its own KV cache inside the call).
    Nothing survives between requests, so warm requests are skipped: they cannot change a time."""

    keeps_cache = False

    def __init__(self, model_path: str, args: argparse.Namespace) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)  # in eval mode
        self.info = {"transformers": transformers.__version__, "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "dtype": "float32"}

    def first_token(self, prompt: str) -> dict[str, Any]:
        with self.torch.inference_mode():
            ids = self.tok(prompt, return_tensors="pt").input_ids  # ids: [1, T]
            out = self.model(ids, use_cache=True, logits_to_keep=1)
            token = int(out.logits[0, -1].argmax())
        return {"prompt_tokens": int(ids.shape[1]), "token": token}

    def reset(self) -> None:
        pass


class Vllm:
    """vLLM (the CPU build) with prefix caching; ``reset`` empties its prefix cache."""

    keeps_cache = True

    def __init__(self, model_path: str, args: argparse.Namespace) -> None:
        import torch
        import vllm
        from vllm import LLM, SamplingParams

        env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU") or k == "LD_PRELOAD"}  # as given
        self.llm = LLM(model=model_path, dtype=args.vllm_dtype, enable_prefix_caching=True,
                       max_model_len=args.max_model_len, seed=0)
        self.params = SamplingParams(max_tokens=1, temperature=0.0)
        cfg = self.llm.llm_engine.vllm_config
        self.info = {
            "vllm": vllm.__version__, "torch": torch.__version__, "dtype": str(cfg.model_config.dtype),
            "block_size": cfg.cache_config.block_size,
            "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
            "enable_chunked_prefill": cfg.scheduler_config.enable_chunked_prefill,
            "env": env,
        }

    def first_token(self, prompt: str) -> dict[str, Any]:
        out = self.llm.generate([prompt], self.params, use_tqdm=False)[0]
        return {"prompt_tokens": len(out.prompt_token_ids or []), "token": out.outputs[0].token_ids[0],
                "cached_tokens": out.num_cached_tokens}

    def reset(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache")


class SparseX:
    """This project's engine, default configuration; ``--method`` picks the reuse method (default:
    the engine's). ``reset`` moves to a new namespace: no later request can hit earlier entries."""

    keeps_cache = True

    def __init__(self, model_path: str, args: argparse.Namespace) -> None:
        import torch

        from sparsex import LLM, SamplingParams

        self.llm = LLM()
        if str(self.llm.engine.model_path) != model_path:
            raise RuntimeError(f"SparseX loaded {self.llm.engine.model_path}, the plan names {model_path}")
        self.method = args.method or self.llm.reuse.method
        self.params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        self.num_resets = 0
        self.info = {"method": self.method, "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "dtype": "float32", "max_prefill_tokens": self.llm.config.max_prefill_tokens}

    def first_token(self, prompt: str) -> dict[str, Any]:
        reuse = {"method": self.method, "namespace": f"peers-{self.num_resets}"}
        m = self.llm.generate(prompt, self.params, reuse=reuse)[0].metrics
        return {"prompt_tokens": m.num_prompt_tokens, "engine_ttft_s": m.ttft_s,
                "cached_tokens": m.num_prefix_hit_tokens + m.num_segment_hit_tokens,
                "compute_fraction": m.compute_fraction}

    def reset(self) -> None:
        self.num_resets += 1


ENGINES: dict[str, Any] = {"transformers": Transformers, "vllm": Vllm, "sparsex": SparseX}


def run(engine: Any, plan: dict[str, Any], repeats: int) -> list[dict[str, Any]]:
    """Every timed step of ``plan``, ``repeats`` times, each group from empty caches."""
    for prompt in plan["warmup"]:
        engine.first_token(prompt)
    rows = []
    for repeat in range(repeats):
        for group in plan["groups"]:
            engine.reset()
            for step in group["steps"]:
                if step.get("reset"):
                    engine.reset()
                    continue
                if step["scenario"] is None and not engine.keeps_cache:
                    continue
                t0 = time.perf_counter()
                out = engine.first_token(step["prompt"])
                seconds = time.perf_counter() - t0
                if step["scenario"] is not None:
                    rows.append({"group": group["name"], "scenario": step["scenario"], "repeat": repeat,
                                 "ttft_s": seconds, **out})
                    print(f"  {group['name']} {step['scenario']} #{repeat}: {seconds:.3f}s, "
                          f"{out['prompt_tokens']} tokens", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=sorted(ENGINES))
    ap.add_argument("plan")
    ap.add_argument("out")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--method", default=None, help="sparsex: the reuse method (default: the engine's)")
    ap.add_argument("--vllm-dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=8192)
    args = ap.parse_args()
    with open(args.plan) as f:
        plan = json.load(f)
    t0 = time.perf_counter()
    engine = ENGINES[args.engine](plan["model_path"], args)
    load_s = time.perf_counter() - t0
    print(f"{args.engine}: loaded in {load_s:.1f}s", flush=True)
    rows = run(engine, plan, args.repeats)
    result = {"engine": args.engine, "info": {**engine.info, "load_s": load_s, "python": sys.executable,
                                              "platform": platform.platform()}, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
