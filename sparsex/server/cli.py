"""``sparsex serve``: the arguments and the entry point (wired into ``sparsex.cli`` by the lead)."""

from __future__ import annotations

import argparse
import re

from sparsex.reuse.options import METHODS
from sparsex.server.auth import Tenants
from sparsex.server.config import ServerConfig

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory(text: str) -> int | float:
    """``0.2`` -> a fraction of available memory; ``512M``, ``2GiB``, ``1073741824`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 0.2, 512M, 2GiB)")
    number, unit = m.groups()
    if not unit and "." in number:
        value = float(number)
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1], got {value}")
        return value
    return int(float(number) * _UNITS[unit])


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="alias, .gguf file, model folder, or Hugging Face Hub id (org/name, "
                             "org/name:file.gguf; HF_TOKEN, HF_HOME, HF_HUB_OFFLINE apply) (default: smollm2)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hub model (default: main)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--reuse", choices=METHODS, default=None,
                        help="reuse method for requests that do not choose one (default: the engine's)")
    parser.add_argument("--kv-cache-memory", type=parse_memory, default=None,
                        help="KV pool: bytes (512M, 2G) or a fraction of free memory (0.15)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="most requests waiting or running; more get HTTP 429")
    parser.add_argument("--max-queue-per-tenant", type=int, default=None, metavar="N",
                        help="most requests one tenant (API key) may have waiting or running; more get HTTP "
                             "429 (default: half of --max-queue with API keys, else no limit of its own)")
    parser.add_argument("--served-model-name", default=None, help="model id clients send (default: --model)")
    parser.add_argument("--default-max-tokens", type=int, default=256,
                        help="max_tokens for requests that do not set it")
    parser.add_argument("--max-prefill-tokens", type=int, default=None, metavar="N",
                        help="prompt tokens per engine step of a full prefill (chunked prefill; default 512, "
                             "0 = unchunked). Smaller: short requests wait less behind long prompts, long "
                             "prompts take longer (docs/BENCHMARKS.md, fairness)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sec = parser.add_argument_group("tenants and security (see sparsex/server/README.md)")
    sec.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' (one tenant, named 'default')")
    sec.add_argument("--api-keys", default=None, metavar="FILE",
                     help="keys file, lines 'KEY TENANT' (# comments): each key's tenant has its own caches "
                          "and segments")
    sec.add_argument("--metrics", choices=["open", "off"], default=None,
                     help="/metrics for anyone (open) or nobody (off); default: open without API keys, "
                          "off with them (unless --metrics-key)")
    sec.add_argument("--metrics-key", default=None, help="/metrics only with 'Authorization: Bearer KEY'")
    sec.add_argument("--hide-cache-usage", action="store_true",
                     help="omit cache hit fields from responses and cache counters from /metrics")
    sec.add_argument("--max-body-bytes", type=int, default=8 << 20, help="largest request body (400 beyond)")
    sec.add_argument("--max-json-depth", type=int, default=32, help="deepest JSON nesting (400 beyond)")
    sec.add_argument("--shutdown-grace", type=float, default=30.0, metavar="SECONDS",
                     help="on SIGTERM, how long running requests may finish before they end with an error")
    store = parser.add_argument_group("KV store tiers below the pool (see sparsex/kvstore/README.md)")
    store.add_argument("--kv-store", default=None, metavar="URL",
                       help="redis://host:port/db shared by every replica (Redis or Valkey)")
    store.add_argument("--kv-disk", default=None, metavar="PATH", help="folder for a local-disk tier")
    store.add_argument("--kv-disk-bytes", type=parse_memory, default=None,
                       help="byte budget of the disk tier (e.g. 20G; default 8G)")
    store.add_argument("--kv-store-dtype", choices=["bfloat16", "float16", "float32"], default=None,
                       help="K/V dtype in the tiers (default bfloat16; float32 is bitwise)")
    ev = parser.add_argument_group("KV events for KV-aware routers, in vLLM's format (see docs/DEPLOYMENT.md)")
    ev.add_argument("--kv-events", default=None, metavar="ENDPOINT",
                    help="publish every block stored / evicted / cleared (pool, disk, Redis) on a ZMQ PUB "
                         "socket bound here, e.g. tcp://*:5557 or tcp://127.0.0.1:5557")
    ev.add_argument("--kv-events-replay", default=None, metavar="ENDPOINT",
                    help="ZMQ ROUTER endpoint where subscribers ask for missed batches (e.g. tcp://*:5558)")
    ev.add_argument("--kv-events-topic", default="", help="topic frame of every message (default: empty)")
    ev.add_argument("--kv-events-token-ids", action="store_true",
                    help="publish token ids of every namespace's blocks (default: only of the shared one; "
                         "tenants' blocks carry hashes only)")
    ev.add_argument("--kv-events-hash-seed", default=None, metavar="SEED",
                    help="seed of the block hashes, vLLM's PYTHONHASHSEED (default: $PYTHONHASHSEED, "
                         "else vLLM's default 'vllm-none-hash')")


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ``ServerConfig`` of ``sparsex serve``'s arguments (raises ValueError / OSError)."""
    tenants = Tenants.load(args.api_key, args.api_keys)
    if args.metrics_key is not None:
        if args.metrics is not None:
            raise ValueError("give --metrics or --metrics-key, not both")
        metrics = "key"
    else:  # with API keys, the server-wide counters are nobody's business by default
        metrics = args.metrics or ("off" if tenants.enabled else "open")
    per_tenant = args.max_queue_per_tenant
    if per_tenant is None and tenants.enabled:
        per_tenant = max(1, args.max_queue // 2)
    return ServerConfig(
        max_queue=args.max_queue,
        max_queue_per_tenant=per_tenant,
        served_model_name=args.served_model_name,
        default_max_tokens=args.default_max_tokens,
        default_reuse=args.reuse,
        tenants=tenants,
        metrics=metrics,
        metrics_key=args.metrics_key,
        hide_cache_usage=args.hide_cache_usage,
        max_body_bytes=args.max_body_bytes,
        max_json_depth=args.max_json_depth,
        shutdown_grace_s=args.shutdown_grace,
    )


def serve_main(args: argparse.Namespace) -> None:
    import logging

    import uvicorn

    from sparsex.llm import LLM
    from sparsex.server.app import create_app
    from sparsex.server.lifecycle import DrainingServer

    config = server_config(args)  # before loading the model: a bad keys file fails fast
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")  # sparsex.* loggers
    kwargs = {} if args.kv_cache_memory is None else {"kv_cache_memory": args.kv_cache_memory}
    kwargs.update(store_kwargs(args))
    kwargs.update(prefill_kwargs(args))
    kwargs.update(events_kwargs(args))
    llm = LLM(model=args.model, device=args.device, revision=getattr(args, "revision", None), **kwargs)
    app = create_app(llm, config)
    # uvicorn's own graceful timeout only matters after the drain, when nothing is left to wait for.
    uv = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    try:
        DrainingServer(uv, app.state.lifecycle).run()
    finally:
        llm.close()  # flush pending KV store writes


def store_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """``LLM`` keyword arguments of the ``--kv-*`` store flags that were given."""
    out = {name: getattr(args, name, None) for name in ("kv_store", "kv_disk", "kv_disk_bytes", "kv_store_dtype")}
    if isinstance(out["kv_disk_bytes"], float):
        raise ValueError("--kv-disk-bytes is a size (20G), not a fraction")
    return {k: v for k, v in out.items() if v is not None}


def events_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """``LLM``'s ``kv_events`` from the ``--kv-events*`` flags, if ``--kv-events`` was given."""
    from sparsex.kvevents import KVEventsConfig

    endpoint = getattr(args, "kv_events", None)
    if endpoint is None:
        given = [f for f in ("kv_events_replay", "kv_events_hash_seed") if getattr(args, f, None) is not None]
        if given or getattr(args, "kv_events_token_ids", False) or getattr(args, "kv_events_topic", ""):
            raise ValueError("the --kv-events-* options need --kv-events ENDPOINT")
        return {}
    return {"kv_events": KVEventsConfig(endpoint, args.kv_events_replay, args.kv_events_topic,
                                        args.kv_events_token_ids, args.kv_events_hash_seed)}


def prefill_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """``LLM``'s ``max_prefill_tokens`` from ``--max-prefill-tokens`` (0: unchunked), if given."""
    n = getattr(args, "max_prefill_tokens", None)
    if n is None:
        return {}
    if n < 0:
        raise ValueError(f"--max-prefill-tokens must be 0 (unchunked) or positive, got {n}")
    return {"max_prefill_tokens": n or None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sparsex serve", description="OpenAI-compatible SparseX server")
    add_serve_arguments(parser)
    serve_main(parser.parse_args(argv))
