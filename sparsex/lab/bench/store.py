"""``sparsex bench store``: TTFT on replica B of reordered documents that only replica A computed.

Replica A serves a RAG prompt (``--docs`` documents of ``--doc-tokens`` tokens as segments) once,
with a Redis tier and a disk tier below its pool, and closes (its writes flushed). Then replica B,
a fresh engine each time (an empty pool), serves the same documents reordered behind another
question, with its KV coming from:

    recompute   no store: a full prefill (method none), the baseline
    redis       kv_store only: the entries are prefetched from Redis, promoted, reused
    disk        kv_disk only (A's folder, as on the same machine)
    pool        no store: B served A's prompt itself first (the in-process cache)

Each row: TTFT, speed-up over recompute, entries promoted, bytes read from the tier and the time
the tier took to answer, the whole prefetch (index lookup, read, verify, copy into the pool), and
whether the first token equals recompute's and the pool row's (the same reuse over in-process KV).
Every engine serves a short warm-up prompt first, so first-call costs stay out of the TTFT. Without ``--redis`` a redis-server from PATH is started
on a free loopback port in a temp folder and stopped (by its PID) at the end.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from sparsex.lab.bench.common import machine, print_table, write_json

INSTRUCTION = "Answer the question using only the documents below.\n\n"
QUESTION_A = "\n\nQuestion: What do these documents have in common?\nAnswer:"
QUESTION_B = "\n\nQuestion: Which document explains the main idea, and what is it?\nAnswer:"


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A throwaway redis-server on 127.0.0.1 (no persistence); the caller stops it by its PID."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server not found: install it (apt-get install redis-server) or pass --redis")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
    for _ in range(100):
        try:
            if client.ping():
                return proc, f"redis://127.0.0.1:{port}/0"
        except redis.RedisError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def prompt_of(docs: list[str], question: str) -> list[Any]:
    from sparsex import Segment

    return [INSTRUCTION, *(Segment(d) for d in docs), question]


def serve_b(args: argparse.Namespace, label: str, prompt: list[Any], store: dict[str, Any],
            warm: list[Any] | None) -> dict[str, Any]:
    """One fresh replica B: optionally serve ``warm`` first, then time ``prompt``."""
    from sparsex import LLM, SamplingParams

    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    method = "none" if label == "recompute" else args.method
    with LLM(model=args.model, kv_cache_memory=args.kv_cache_memory, max_prefill_tokens=None,
             kv_store_dtype=args.storage, **store) as llm:
        llm.generate(["Warm-up."], one, reuse={"method": "none", "register": False})  # first-call costs
        if warm is not None:
            llm.generate([warm], one, reuse="none")
        out = llm.generate([prompt], one, reuse={"method": method, "register": False})[0]
        stats = llm.engine.tiers.stats if llm.engine.tiers is not None else None
        row = {
            "source": label, "method": method, "prompt_tokens": out.metrics.num_prompt_tokens,
            "ttft_s": out.metrics.ttft_s, "hit_tokens": out.metrics.num_segment_hit_tokens,
            "promoted": stats.num_promoted if stats else 0,
            "bytes": sum(stats.bytes_by_tier.values()) if stats else 0,
            "read_s": sum(stats.read_s_by_tier.values()) if stats else 0.0,
            "prefetch_s": stats.promote_s if stats else 0.0,
            "first_token": out.token_ids[:1],
        }
    del llm
    gc.collect()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sparsex bench store", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=500, help="tokens per document (8 x 500: a ~4k prompt)")
    ap.add_argument("--redis", default=None, metavar="URL", help="an existing Redis (default: start one)")
    ap.add_argument("--storage", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--method", default="naive", help="reuse method of the store and pool rows")
    ap.add_argument("--kv-cache-memory", type=int, default=1 << 30, help="KV pool bytes of each engine")
    ap.add_argument("--out", default="out/bench_store.json")
    args = ap.parse_args(argv)

    from sparsex import LLM, SamplingParams
    from sparsex.lab.bench.plain import documents

    work = Path(tempfile.mkdtemp(prefix="sparsex-bench-store-"))
    proc = None
    try:
        url = args.redis
        if url is None:
            proc, url = start_redis(work)
        disk = str(work / "disk")
        a_store = {"kv_store": url, "kv_disk": disk, "kv_disk_bytes": 64 << 30}
        with LLM(model=args.model, kv_cache_memory=args.kv_cache_memory, kv_store_dtype=args.storage,
                 max_prefill_tokens=None, **a_store) as a:
            docs = documents(a, args.docs, args.doc_tokens, seed=args.docs * args.doc_tokens)
            prompt_a = prompt_of(docs, QUESTION_A)
            a.generate([prompt_a], SamplingParams(max_tokens=1, temperature=0.0), reuse="none")
            model_name = a.model_name
        # a.close() (the with block) flushed A's writes: Redis and the disk folder hold every document
        prompt_b = prompt_of(docs[::-1], QUESTION_B)
        rows = [
            serve_b(args, "recompute", prompt_b, {}, None),
            serve_b(args, "redis", prompt_b, {"kv_store": url}, None),
            serve_b(args, "disk", prompt_b, {"kv_disk": disk, "kv_disk_bytes": 64 << 30}, None),
            serve_b(args, "pool", prompt_b, {}, prompt_a),
        ]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["ttft_s"]
    for r in rows:
        r["speedup"] = base / r["ttft_s"] if r["ttft_s"] > 0 else 0.0
        r["same_first_token"] = r["first_token"] == rows[0]["first_token"]
        r["same_as_pool"] = r["first_token"] == rows[-1]["first_token"]
    print(f"\nreplica B, {args.docs} documents x {args.doc_tokens} tokens reordered, computed only by replica A; "
          f"storage {args.storage}, method {args.method}")
    print_table(
        ["source", "tokens", "TTFT s", "speedup", "hit tokens", "entries", "MB read", "read s", "prefetch s",
         "top1 = recompute", "top1 = pool"],
        [[r["source"], r["prompt_tokens"], r["ttft_s"], f"{r['speedup']:.1f}x", r["hit_tokens"], r["promoted"],
          f"{r['bytes'] / 1e6:.1f}", r["read_s"], r["prefetch_s"], "yes" if r["same_first_token"] else "no",
          "yes" if r["same_as_pool"] else "no"]
         for r in rows],
    )
    write_json(args.out, {"machine": machine(), "model": model_name, "args": vars(args), "rows": rows})
    return 0
