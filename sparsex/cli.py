"""Command line: ``sparsex generate | chat | demo | serve | bench | eval``."""

from __future__ import annotations

import argparse
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="alias (smollm2, gemma3-270m), .gguf file, model folder or Hub id (org/name)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--kv-dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _add_revision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub model (default: main)")


def _sampling(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from sparsex import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=args.stop or [],
    )


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 64) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def cmd_generate(args: argparse.Namespace) -> int:
    from sparsex import LLM

    llm = LLM(model=args.model, device=args.device, kv_dtype=args.kv_dtype, revision=args.revision)
    req = llm.add_request(args.prompt, _sampling(args))
    for delta in llm.stream(req):
        print(delta, end="", flush=True)
    print()
    m = req.metrics
    print(f"[{m.num_prompt_tokens} prompt tokens, {m.num_generated_tokens} generated, "
          f"TTFT {m.ttft_s * 1e3:.0f} ms, {m.latency_s:.2f} s total]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from sparsex import LLM

    llm = LLM(model=args.model, device=args.device, kv_dtype=args.kv_dtype, revision=args.revision)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("Chat with the model (empty line or Ctrl-D to quit).", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        ids, spans = llm.tokenizer.encode_prompt(llm.tokenizer.chat_parts(history), source="chat")
        req = llm.add_tokenized(ids, _sampling(args), spans)
        print("assistant> ", end="", flush=True)
        for delta in llm.stream(req):
            print(delta, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": req.text})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sparsex.demo import run_demo

    return run_demo(model=args.model, device=args.device, quick=args.quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsex", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("generate", help="complete a prompt (streams tokens)")
    p.add_argument("prompt")
    _add_model_args(p)
    _add_revision_arg(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (streams tokens)")
    _add_model_args(p)
    _add_revision_arg(p)
    _add_sampling_args(p, max_tokens=256)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo", help="the reuse scenarios on the default model, every method side by side")
    _add_model_args(p)
    p.add_argument("--quick", action="store_true", help="smaller prompts")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmarks (tables + JSON)")
    p.add_argument("which", choices=["prefill", "reuse", "serve", "layers", "store", "seams"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    try:
        from sparsex.server.cli import add_serve_arguments, serve_main

        p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
        add_serve_arguments(p)
        p.set_defaults(func=serve_main)
    except ImportError:
        pass

    p = sub.add_parser("eval", help="quality of every reuse method against full prefill")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_eval)

    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["eval"] or (raw[:1] == ["bench"] and len(raw) > 1 and not raw[1].startswith("-")):
        # sub-tools own their flags: pass everything after the tool name through untouched
        args = parser.parse_args(raw[: 1 if raw[0] == "eval" else 2])
        args.rest = raw[1 if raw[0] == "eval" else 2 :]
    else:
        args = parser.parse_args(raw)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    mod = importlib.import_module(f"sparsex.lab.bench.{args.which}")
    return int(mod.main(args.rest) or 0)


def cmd_eval(args: argparse.Namespace) -> int:
    import importlib

    return int(importlib.import_module("sparsex.lab.bench.evaluate").main(args.rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
