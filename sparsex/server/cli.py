"""``sparsex serve``: the arguments and the entry point (wired into ``sparsex.cli`` by the lead)."""

from __future__ import annotations

import argparse
import re

from sparsex.server.protocol import reuse_methods

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
    parser.add_argument("--model", default=None, help="alias, .gguf file or model folder (default: smollm2)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--reuse", choices=reuse_methods(), default=None,
                        help="reuse method for requests that do not choose one (default: the engine's)")
    parser.add_argument("--kv-cache-memory", type=parse_memory, default=None,
                        help="KV pool: bytes (512M, 2G) or a fraction of free memory (0.15)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="most requests waiting or running; more get HTTP 429")
    parser.add_argument("--served-model-name", default=None, help="model id clients send (default: --model)")
    parser.add_argument("--default-max-tokens", type=int, default=256,
                        help="max_tokens for requests that do not set it")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def serve_main(args: argparse.Namespace) -> None:
    import uvicorn

    from sparsex.engine import LLM
    from sparsex.server.app import create_app

    kwargs = {} if args.kv_cache_memory is None else {"kv_cache_memory": args.kv_cache_memory}
    llm = LLM(model=args.model, device=args.device, **kwargs)
    app = create_app(
        llm,
        max_queue=args.max_queue,
        served_model_name=args.served_model_name,
        default_max_tokens=args.default_max_tokens,
        default_reuse=args.reuse,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sparsex serve", description="OpenAI-compatible SparseX server")
    add_serve_arguments(parser)
    serve_main(parser.parse_args(argv))
