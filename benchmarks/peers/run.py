"""Peer comparison: time to first token of HF transformers, vLLM-CPU and SparseX on the same prompts.

Builds every prompt once (``prompts.py``), then runs one engine process at a time (``worker.py``,
with the engine's own Python), so engines never share the CPU. Prints one table, engine x scenario:
TTFT in seconds, as a ratio to the engine's own cold prompt, and to transformers; writes JSON.

    .venv/bin/python benchmarks/peers/run.py                       # everything, defaults
    .venv/bin/python benchmarks/peers/run.py --engines transformers,sparsex --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from prompts import build_plan, scenarios  # noqa: E402

ENGINES = ("transformers", "vllm", "sparsex")
# vLLM-CPU's own knobs: OpenMP threads pinned to both cores, a 2 GiB KV cache.
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2"}
EXCEPTION = re.compile(r"\s*[\w.]*(Error|Exception|Interrupt)\w*(:|$)")  # a traceback's last line
COLD_OF = {"musique": "musique cold", "musique cold": "musique cold"}  # a scenario's own cold prompt; "cold" for the rest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, run in this order")
    ap.add_argument("--sparsex-methods", default="default,naive",
                    help="one SparseX row (and process) per reuse method; 'default' = the engine's own")
    ap.add_argument("--vllm-python", default=str(ROOT.parent / "vllm-venv" / "bin" / "python"),
                    help="Python of the venv made by setup_vllm.sh")
    ap.add_argument("--vllm-dtype", default="float32")
    ap.add_argument("--vllm-preload", action="store_true",
                    help="LD_PRELOAD the venv's libiomp5 and the system's libtcmalloc, as vLLM's CPU docs advise")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every group; the median is reported")
    ap.add_argument("--docs", type=int, default=8, help="documents per prompt")
    ap.add_argument("--doc-tokens", type=int, default=480, help="tokens per document (8 x 480: ~4k-token prompts)")
    ap.add_argument("--musique-items", type=int, default=3, help="MuSiQue tune items 0..N-1 (0: skip)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder of musique_s.json")
    ap.add_argument("--out", default="out/peers.json")
    return ap.parse_args(argv)


def rows_to_run(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(row label, engine, extra worker arguments) in run order."""
    rows = []
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        if engine not in ENGINES:
            raise SystemExit(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
        if engine == "sparsex":
            for method in [m.strip() for m in args.sparsex_methods.split(",") if m.strip()]:
                label = "sparsex" if method == "default" else f"sparsex {method}"
                rows.append((label, engine, [] if method == "default" else ["--method", method]))
        elif engine == "vllm":
            rows.append(("vllm", engine, ["--vllm-dtype", args.vllm_dtype]))
        else:
            rows.append((engine, engine, []))
    return rows


def vllm_problem(python: str) -> str | None:
    """Why vLLM cannot run from ``python`` (None: it imports)."""
    if not Path(python).exists():
        return f"no Python at {python}; create the venv with benchmarks/peers/setup_vllm.sh"
    probe = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`import vllm` failed in {python}: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def vllm_env(preload: bool, python: str) -> dict[str, str]:
    env = {**os.environ, **VLLM_ENV}
    if preload:
        libs = [str(p) for p in (Path(python).parent.parent / "lib").glob("libiomp5.so")]
        found = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
        libs += [line.split("=>")[-1].strip() for line in found.splitlines() if "libtcmalloc_minimal.so.4 " in line][:1]
        env["LD_PRELOAD"] = ":".join(libs)
    return env


def run_worker(label: str, engine: str, extra: list[str], args: argparse.Namespace, plan_path: Path,
               out_dir: Path) -> dict[str, Any]:
    """One engine process; returns its results, or ``{"error": ...}`` when it could not run."""
    python, env = sys.executable, dict(os.environ)
    if engine == "vllm":
        problem = vllm_problem(args.vllm_python)
        if problem:
            print(f"{label}: skipped: {problem}", flush=True)
            return {"error": problem}
        python, env = args.vllm_python, vllm_env(args.vllm_preload, args.vllm_python)
    slug = label.replace(" ", "-")
    result_path, log_path = out_dir / f"{slug}.json", out_dir / f"{slug}.log"
    result_path.unlink(missing_ok=True)
    cmd = [python, str(HERE / "worker.py"), engine, str(plan_path), str(result_path),
           "--repeats", str(args.repeats), *extra]
    print(f"{label}: running (log: {log_path})", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_path.exists():
        lines = log_path.read_text().strip().splitlines()
        # the first exception is the root cause (vLLM's engine process reports it before the caller)
        errors = list(dict.fromkeys(line.strip() for line in lines if EXCEPTION.match(line))) or lines[-1:]
        print(f"{label}: FAILED (exit {proc.returncode}) after {wall:.0f}s; last lines of {log_path}:")
        print("\n".join("    " + line for line in lines[-15:]))
        reason = " ... ".join(errors[:1] + errors[-1:] if len(errors) > 1 else errors) or "no output"
        return {"error": f"exit {proc.returncode}: {reason}", "log": str(log_path)}
    print(f"{label}: done in {wall:.0f}s", flush=True)
    return {**json.loads(result_path.read_text()), "wall_s": wall, "log": str(log_path)}


def medians(result: dict[str, Any], key: str) -> dict[str, float]:
    """Per scenario, the median of ``key`` over repeats (and MuSiQue items)."""
    by: dict[str, list[float]] = {}
    for r in result.get("rows", []):
        if r.get(key) is not None:
            by.setdefault(r["scenario"], []).append(float(r[key]))
    return {s: statistics.median(v) for s, v in by.items()}


def summarize(results: dict[str, dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    ref = medians(results["transformers"], "ttft_s") if "transformers" in results else {}
    out = {}
    for label, res in results.items():
        if "error" in res:
            continue
        ttft = medians(res, "ttft_s")
        out[label] = {s: {
            "ttft_s": ttft[s],
            "vs_cold": ttft[s] / ttft[COLD_OF.get(s, "cold")] if COLD_OF.get(s, "cold") in ttft else None,
            "vs_transformers": ttft[s] / ref[s] if s in ref else None,
            "prompt_tokens": medians(res, "prompt_tokens").get(s),
            "cached_tokens": medians(res, "cached_tokens").get(s),
            "compute_fraction": medians(res, "compute_fraction").get(s),
        } for s in names if s in ttft}
    return out


def print_table(summary: dict[str, dict[str, Any]], names: list[str]) -> None:
    def cell(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    measures = [("TTFT s", "ttft_s", ".3f"), ("/ own cold", "vs_cold", ".3f"),
                ("/ transformers", "vs_transformers", ".3f"), ("cached tokens", "cached_tokens", ".0f")]
    headers = ["engine", "", *names]
    lines = []
    for label, cells in summary.items():
        for i, (title, key, fmt) in enumerate(measures):
            values = [cells.get(s, {}).get(key) for s in names]
            if key == "cached_tokens" and all(v is None for v in values):
                continue
            lines.append([label if i == 0 else "", title, *(cell(v, fmt) for v in values)])
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))))
    for r in lines:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sparsex.lab.bench.common import machine, write_json
    from sparsex.models.loader import resolve_model

    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["run.py", *argv])
    out = Path(args.out)
    work = out.with_suffix("")  # plan and per-engine logs/results next to the JSON
    work.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(None)  # the default model's safetensors folder (converted once)
    plan = build_plan(model_path, Path(args.data), args.docs, args.doc_tokens, args.musique_items)
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(plan))
    names = scenarios(plan)
    print(f"model {model_path}\nplan {plan_path}: {len(plan['groups'])} groups, scenarios: {', '.join(names)}")

    results = {label: run_worker(label, engine, extra, args, plan_path, work)
               for label, engine, extra in rows_to_run(args)}
    summary = summarize(results, names)
    print(f"\nTTFT (max_tokens=1), median of {args.repeats} repeat(s)"
          + (f" x {args.musique_items} MuSiQue item(s); musique is compared with musique cold, the rest with"
             " cold" if args.musique_items else ""))
    if summary:
        print_table(summary, names)
    else:
        print("no engine produced times")
    for label, res in results.items():
        if "error" in res:
            print(f"{label}: skipped: {res['error']}")
        else:
            info = {k: v for k, v in res["info"].items() if k not in ("python", "platform")}
            print(f"{label}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    tokens = {label: {s: c["prompt_tokens"] for s, c in cells.items()} for label, cells in summary.items()}
    if len({json.dumps(t, sort_keys=True) for t in tokens.values()}) > 1:
        print(f"note: engines tokenized the prompts differently: {tokens}")
    print(f"\ncommand: {command}")
    write_json(str(out), {
        "command": command, "machine": machine(), "model_path": str(model_path), "args": vars(args),
        "vllm_env": VLLM_ENV, "scenarios": names, "summary": summary,
        "engines": {label: {k: v for k, v in res.items() if k != "rows"} for label, res in results.items()},
        "rows": {label: res.get("rows", []) for label, res in results.items()},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
