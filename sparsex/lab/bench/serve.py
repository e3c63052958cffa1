"""Load benchmark of the HTTP server: multi-agent and RAG conversations, KV reuse off vs on.

    python -m sparsex.lab.bench.serve --conversations 8 --concurrency 4      # or: sparsex bench serve ...

Each run loads a fresh engine, starts the server in-process on a free loopback port and replays
the same conversation set (generated from ``--seed``) through the openai client, streaming, with
at most ``--concurrency`` conversations at once. Turns of a conversation are sequential (later
turns see earlier replies); conversations overlap, so requests join running decode batches.

- RAG: the same documents, in another order and combination each turn, behind a new question.
- Agents: a group chat; each agent has its own system prompt and sees the shared tool output
  and every earlier agent's message, so the shared text is never its prompt's prefix.

Reported per run: client-side TTFT n, p50, p99 (only with 100 requests or more: below that it
would be the max), max and mean, output tokens/s, requests/s, and the share of prompt tokens served
from cache (prefix + segment hits) and recomputed (from the usage extension).

Other modes, each in its own module: ``--fairness`` (short requests behind long prefills,
``fairness.py``), ``--open-loop`` (Poisson arrivals from two tenants, ``openloop.py``), ``--soak``
(memory of many requests, ``soak.py``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from sparsex.lab.bench.common import machine, percentile, print_table, tail_percentile, write_json
from sparsex.reuse.options import METHODS
from sparsex.server.cli import parse_memory

RAG_SYSTEM = "You answer questions using only the documents the user provides."
QUESTIONS = (
    "Summarize what the documents say in one sentence.",
    "Which document is the most technical, and why?",
    "What do the documents have in common?",
    "List two facts stated in the documents.",
    "What would a beginner find confusing here?",
    "Which statement in the documents is the most surprising?",
)
AGENTS = {
    "Planner": "You are the Planner agent. You break the team's task into concrete steps.",
    "Critic": "You are the Critic agent. You look for mistakes in what the others wrote.",
    "Writer": "You are the Writer agent. You turn the team's material into a clear explanation.",
    "Researcher": "You are the Researcher agent. You check facts against the tool outputs.",
}


@dataclass
class Conversation:
    """One conversation of the workload.

    kind: ``rag`` (questions over documents) or ``agents`` (a group chat over tool outputs).
    docs: the retrieved documents / tool outputs it uses.
    orders: per turn, the order of ``docs`` (RAG) -- the same text at other positions.
    questions: per turn, the question (RAG) or the agent's name (agents).
    """

    kind: str
    docs: list[str]
    orders: list[list[int]] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)


@dataclass
class RequestStats:
    """One request as the client saw it, plus the server's usage counts."""

    conversation: int
    turn: int
    ttft_s: float
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    recomputed_tokens: int


def make_conversations(args: argparse.Namespace) -> list[Conversation]:
    """The workload: conversations drawing documents from one shared pool (seeded)."""
    from sparsex.lab.workloads import passages

    rng = random.Random(args.seed)
    pool = passages(args.doc_chars // 2, args.doc_chars, args.seed)[: max(args.docs + 1, args.docs * 2)]
    kinds = {"rag": ["rag"], "agents": ["agents"], "mixed": ["rag", "agents"]}[args.scenario]
    convs = []
    for i in range(args.conversations):
        kind = kinds[i % len(kinds)]
        docs = rng.sample(pool, args.docs)
        if kind == "rag":
            orders = [rng.sample(range(len(docs)), len(docs)) for _ in range(args.turns)]
            convs.append(Conversation(kind, docs, orders, rng.sample(QUESTIONS, min(args.turns, len(QUESTIONS)))))
        else:
            names = [rng.choice(sorted(AGENTS)) for _ in range(args.turns)]
            convs.append(Conversation(kind, docs, questions=names))
    return convs


def turn_messages(conv: Conversation, turn: int, replies: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The chat messages of one turn; every text part is a segment the server can reuse."""
    if conv.kind == "rag":
        parts = [{"type": "text", "text": conv.docs[j] + "\n\n"} for j in conv.orders[turn]]
        parts.append({"type": "text", "text": conv.questions[turn % len(conv.questions)]})
        return [{"role": "system", "content": RAG_SYSTEM}, {"role": "user", "content": parts}]
    name = conv.questions[turn]
    shared = [{"type": "text", "text": f"Tool output {j + 1}:\n{d}\n\n"} for j, d in enumerate(conv.docs)]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": AGENTS[name]},
        {"role": "user", "content": [{"type": "text", "text": "Task: write a short guide from these notes.\n"},
                                     *shared]},
    ]
    for speaker, text in replies:
        messages.append({"role": "user", "content": [{"type": "text", "text": f"{speaker} said:"},
                                                     {"type": "text", "text": text or "(nothing)"}]})
    messages.append({"role": "user", "content": f"{name}, your turn."})
    return messages


def run_conversation(client: Any, model: str, index: int, conv: Conversation, reuse: str,
                     max_tokens: int) -> list[RequestStats]:
    stats: list[RequestStats] = []
    replies: list[tuple[str, str]] = []
    for turn in range(len(conv.questions)):
        t0 = time.perf_counter()
        first: float | None = None
        text: list[str] = []
        usage: Any = None
        stream = client.chat.completions.create(
            model=model, messages=turn_messages(conv, turn, replies), max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"sparsex": {"reuse": reuse}},
        )
        for chunk in stream:
            if first is None and chunk.choices:
                first = time.perf_counter()
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
        end = time.perf_counter()
        usage = usage or {}
        stats.append(RequestStats(
            conversation=index, turn=turn, ttft_s=(first or end) - t0, latency_s=end - t0,
            prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0),
            cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            recomputed_tokens=usage.get("recomputed_tokens", 0),
        ))
        if conv.kind == "agents":
            replies.append((conv.questions[turn], "".join(text)))
    return stats


def summarize(reuse: str, stats: list[RequestStats], wall_s: float) -> dict[str, Any]:
    ttft = [s.ttft_s for s in stats]
    prompt = sum(s.prompt_tokens for s in stats)
    return {
        "reuse": reuse,
        "num_requests": len(stats),
        "wall_s": wall_s,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": tail_percentile(ttft, 99),
        "ttft_max_s": max(ttft),
        "ttft_mean_s": statistics.fmean(ttft),
        "latency_mean_s": statistics.fmean(s.latency_s for s in stats),
        "output_tokens_per_s": sum(s.completion_tokens for s in stats) / wall_s,
        "requests_per_s": len(stats) / wall_s,
        "prompt_tokens": prompt,
        "cached_fraction": sum(s.cached_tokens for s in stats) / max(1, prompt),
        "recomputed_fraction": sum(s.recomputed_tokens for s in stats) / max(1, prompt),
    }


def run(args: argparse.Namespace, reuse: str, convs: list[Conversation]) -> dict[str, Any]:
    """One run on a fresh engine (no cache carried over); returns its summary (with per-request stats)."""
    import openai

    from sparsex import LLM
    from sparsex.server.app import create_app
    from sparsex.server.background import BackgroundServer

    kwargs = {} if args.kv_cache_memory is None else {"kv_cache_memory": args.kv_cache_memory}
    llm = LLM(model=args.model, device=args.device, **kwargs)
    app = create_app(llm, max_queue=max(256, 2 * args.concurrency), default_max_tokens=args.max_tokens)
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=3600)
        model = client.models.list().data[0].id
        client.completions.create(model=model, prompt="warm up", max_tokens=2)  # first-call overheads
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            futures = [pool.submit(run_conversation, client, model, i, c, reuse, args.max_tokens)
                       for i, c in enumerate(convs)]
            stats = [s for f in futures for s in f.result()]
        wall = time.perf_counter() - t0
        client.close()
    summary = summarize(reuse, stats, wall)
    summary["requests"] = [asdict(s) for s in stats]
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparsex bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="alias, .gguf file or model folder (default: smollm2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-cache-memory", type=parse_memory, default=None, help="bytes (512M) or a fraction")
    p.add_argument("--scenario", choices=["rag", "agents", "mixed"], default="mixed")
    p.add_argument("--conversations", type=int, default=8, help="number of conversations")
    p.add_argument("--turns", type=int, default=3, help="questions per RAG conversation / agents per group chat")
    p.add_argument("--docs", type=int, default=3, help="documents or tool outputs per conversation")
    p.add_argument("--doc-chars", type=int, default=800, help="longest document, in characters")
    p.add_argument("--concurrency", type=int, default=4, help="conversations in flight at once")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    p.add_argument("--reuse", choices=[m for m in METHODS if m != "none"], default=None,
                   help="reuse method of the 'on' run (default: blend)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/bench_serve.json")
    args = p.parse_args(argv)
    for name in ("conversations", "turns", "docs", "concurrency", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    modes = {"--fairness": "fairness", "--open-loop": "openloop", "--soak": "soak"}  # their own modules
    for flag, name in modes.items():
        if argv is not None and flag in argv:
            import importlib

            mode = importlib.import_module(f"sparsex.lab.bench.{name}")
            return int(mode.main([a for a in argv if a != flag]))
    args = parse_args(argv)
    convs = make_conversations(args)
    off = run(args, "none", convs)
    method = args.reuse or "blend"
    on = run(args, method, convs)
    headers = ["reuse", "n", "TTFT p50 ms", "TTFT p99 ms", "TTFT max ms", "TTFT mean ms", "out tok/s", "req/s",
               "cached %", "recomputed %"]
    rows = [
        [r["reuse"], r["num_requests"], r["ttft_p50_s"] * 1e3,
         None if r["ttft_p99_s"] is None else r["ttft_p99_s"] * 1e3, r["ttft_max_s"] * 1e3, r["ttft_mean_s"] * 1e3,
         r["output_tokens_per_s"], r["requests_per_s"], 100 * r["cached_fraction"], 100 * r["recomputed_fraction"]]
        for r in (off, on)
    ]
    print_table(headers, rows)
    print("(TTFT p99 is '-' below 100 requests: it would be the max)")
    print(f"TTFT p50 speedup with reuse={method}: {off['ttft_p50_s'] / max(on['ttft_p50_s'], 1e-9):.2f}x")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    write_json(args.out, {"config": config, "machine": machine(),
                          "reuse_method": method, "runs": [off, on]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
