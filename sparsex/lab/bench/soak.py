"""``sparsex bench serve --soak``: memory and store sizes over many requests (10,000 by default).

    sparsex bench serve --soak --requests 10000 --concurrency 4 --kv-disk-bytes 512M

A fresh engine and server (two tenants' API keys, reuse on, a disk tier and a Redis tier) serve
``--requests`` chat completions from ``--concurrency`` clients, a mix of ``--mix`` prompt classes
(``load.py``: short prompts over a shared document pool, fresh random text that writes new store
entries, long prose). Redis is ``--kv-store URL`` if given, else a ``redis-server`` started here
on a free loopback port with ``--redis-maxmemory`` and LRU eviction (the run goes on without Redis
if the binary is missing, and says so).

Sampled before the first request, every ``--requests / --samples`` requests, and after the last
(then again after a garbage collection): the process's resident memory (engine, server and clients
share the process), the KV pool (blocks used, cached, pinned), the disk tier's bytes and files,
and Redis's ``used_memory`` and key count. Reported: the samples, the RSS growth over the run's
second half (a leak keeps growing once caches are full; a warm-up does not), statuses, TTFT.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import random
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sparsex.lab.bench.common import latency_summary, machine, print_table, write_json
from sparsex.lab.bench.load import Prompts, Sent, add_server_arguments, clients, send, serving
from sparsex.server.cli import parse_memory


def rss_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc``), else its peak (``getrusage``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def folder_size(path: str) -> tuple[int, int]:
    """(bytes, files) under ``path``."""
    size = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                size += os.path.getsize(os.path.join(root, name))
                files += 1
            except OSError:  # evicted while walking
                pass
    return size, files


def sample(phase: str, done: int, llm: Any, disk: str, redis_client: Any) -> dict[str, Any]:
    pool = llm.engine.pool
    disk_bytes, disk_files = folder_size(disk)
    out: dict[str, Any] = {"phase": phase, "requests_done": done, "rss_bytes": rss_bytes(),
                           "pool_used_blocks": pool.num_blocks - pool.num_free_blocks,
                           "pool_cached_blocks": pool.num_cached_blocks, "pool_pinned_blocks": pool.num_pinned_blocks,
                           "pool_blocks": pool.num_blocks, "disk_bytes": disk_bytes, "disk_files": disk_files,
                           "redis_used_bytes": None, "redis_keys": None, "threads": threading.active_count()}
    if redis_client is not None:
        try:
            out["redis_used_bytes"] = int(redis_client.info("memory")["used_memory"])
            out["redis_keys"] = int(redis_client.dbsize())
        except Exception as e:  # Redis is an accelerator: the sample says it was unreachable
            out["redis_error"] = type(e).__name__
    return out


@contextmanager
def local_redis(maxmemory: str) -> Iterator[str | None]:
    """A ``redis-server`` of our own on a free loopback port (None when the binary is missing)."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="sparsex-soak-redis-") as folder:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no", "--dir", folder, "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port, socket_timeout=1)
            for _ in range(100):
                try:
                    if client.ping():
                        break
                except redis.ConnectionError:
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


def parse_mix(text: str) -> dict[str, float]:
    mix = {k: float(v) for k, v in (item.split(":") for item in text.split(","))}
    if not mix or set(mix) - {"short", "long", "fresh"} or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"bad --mix {text!r}: expected e.g. short:0.85,fresh:0.15 (classes short, long, fresh)")
    return mix


def run(args: argparse.Namespace, redis_url: str | None, disk: str) -> dict[str, Any]:
    import redis

    prompts = Prompts(args)
    kinds, weights = zip(*args.mix.items(), strict=True)
    store = {"kv_disk": disk, "kv_disk_bytes": args.kv_disk_bytes, **({"kv_store": redis_url} if redis_url else {})}
    rc = redis.Redis.from_url(redis_url, socket_timeout=2) if redis_url else None
    sent: list[Sent] = []
    samples = []
    every = max(1, args.requests // args.samples)
    with serving(args, args.max_prefill_tokens or None, **store) as (llm, base_url):
        tenants = clients(base_url)
        model = tenants["a"].models.list().data[0].id
        samples.append(sample("before", 0, llm, disk, rc))
        counter = itertools.count()
        lock = threading.Lock()
        t0 = time.perf_counter()

        def worker(seed: int) -> None:
            wrng = random.Random(f"sparsex-soak-worker:{args.seed}:{seed}")
            while (i := next(counter)) < args.requests:
                tenant = "ab"[i % 2]
                kind = wrng.choices(kinds, weights)[0]
                s = Sent(tenant, kind, time.perf_counter() - t0)
                send(tenants[tenant], model, prompts.messages(kind, wrng), s, t0, args)
                with lock:
                    sent.append(s)
                    done = len(sent)
                if done % every == 0 and done < args.requests:
                    with lock:
                        samples.append(sample("during", done, llm, disk, rc))

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if llm.engine.tiers is not None:
            llm.engine.tiers.writer.flush(timeout=60)
        samples.append(sample("after", len(sent), llm, disk, rc))
        gc.collect()
        samples.append(sample("after gc", len(sent), llm, disk, rc))
        for c in tenants.values():
            c.close()
    samples.sort(key=lambda x: (x["requests_done"], x["phase"] != "before"))
    return {"wall_s": wall, "redis": redis_url is not None, "samples": samples, "summary": summarize(sent, samples),
            "requests": [asdict(s) for s in sent]}


def summarize(sent: list[Sent], samples: list[dict[str, Any]]) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for s in sent:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    during = [x for x in samples if x["phase"] == "during"]
    half = during[len(during) // 2]["rss_bytes"] if during else samples[0]["rss_bytes"]
    return {"requests": len(sent), "statuses": statuses,
            "ttft_s": latency_summary([s.ttft_s for s in sent if s.ttft_s is not None]),
            "rss_before_bytes": samples[0]["rss_bytes"], "rss_after_gc_bytes": samples[-1]["rss_bytes"],
            "rss_growth_second_half_bytes": samples[-1]["rss_bytes"] - half}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparsex bench serve --soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(p)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=4, help="clients sending one request after another")
    p.add_argument("--mix", type=parse_mix, default=parse_mix("short:0.85,fresh:0.15"),
                   help="prompt classes and their shares (short, long, fresh)")
    p.add_argument("--samples", type=int, default=20, help="samples during the run")
    p.add_argument("--max-prefill-tokens", type=int, default=512, help="0 = unchunked")
    p.add_argument("--kv-store", default=None, metavar="URL", help="Redis to use (default: start a local one)")
    p.add_argument("--no-redis", action="store_true", help="no Redis tier at all")
    p.add_argument("--redis-maxmemory", default="512mb", help="maxmemory of the local redis-server (LRU)")
    p.add_argument("--kv-disk", default=None, metavar="PATH", help="disk tier folder (default: a temporary one)")
    p.add_argument("--kv-disk-bytes", type=parse_memory, default=512 << 20, help="disk tier budget")
    p.add_argument("--out", default="out/bench_soak.json")
    p.add_argument("--plot", default=None, help="write the sizes against requests (PNG) here")
    p.set_defaults(max_tokens=4)
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.samples < 1:
        p.error("--requests, --concurrency and --samples must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sparsex-soak-disk-") as tmp:
        disk = args.kv_disk or tmp
        if args.no_redis:
            result = run(args, None, disk)
        elif args.kv_store:
            result = run(args, args.kv_store, disk)
        else:
            with local_redis(args.redis_maxmemory) as url:
                if url is None:
                    print("redis-server not found: running without a Redis tier")
                result = run(args, url, disk)
    mb = 1 / (1 << 20)
    print(f"\nsoak: {args.requests} requests, {args.concurrency} clients, mix {args.mix}, "
          f"Redis {'on' if result['redis'] else 'off'}, {result['wall_s']:.0f} s")
    print_table(["phase", "requests", "RSS MB", "pool used", "pool cached", "pool pinned", "disk MB", "disk files",
                 "redis MB", "redis keys"],
                [[x["phase"], x["requests_done"], x["rss_bytes"] * mb, x["pool_used_blocks"], x["pool_cached_blocks"],
                  x["pool_pinned_blocks"], x["disk_bytes"] * mb, x["disk_files"],
                  None if x["redis_used_bytes"] is None else x["redis_used_bytes"] * mb, x["redis_keys"]]
                 for x in result["samples"]])
    s = result["summary"]
    t = s["ttft_s"]
    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    print(f"statuses {s['statuses']}; TTFT n={t['n']} p50={secs(t['p50'])} p99={secs(t['p99'])} "
          f"max={secs(t['max'])} s; "
          f"RSS {s['rss_before_bytes'] * mb:.0f} MB before, {s['rss_after_gc_bytes'] * mb:.0f} MB after, "
          f"{s['rss_growth_second_half_bytes'] * mb:+.1f} MB over the second half")
    write_json(args.out, {"config": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine(),
                          **result})
    if args.plot:
        plot(result["samples"], args.plot)
    return 0


def plot(samples: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s["requests_done"] for s in samples]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    mb = 1 / (1 << 20)
    ax.plot(x, [s["rss_bytes"] * mb for s in samples], marker="o", label="process RSS")
    ax.plot(x, [s["disk_bytes"] * mb for s in samples], marker="s", label="disk tier")
    if any(s["redis_used_bytes"] is not None for s in samples):
        ax.plot(x, [(s["redis_used_bytes"] or 0) * mb for s in samples], marker="^", label="Redis used_memory")
    ax.set_xlabel("requests done")
    ax.set_ylabel("MB")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
