"""Shared pieces of the server load benchmarks (``--open-loop``, ``--soak``): a server in-process
with two tenants' API keys, the prompts, and one streamed chat request as the client saw it.

Prompts are chat messages whose every text part is a segment the server can reuse:

- short: ``--short-docs`` documents drawn from a shared pool of ``--pool`` passages (each about
  ``--doc-chars`` characters), then a question: after the first few requests mostly cache hits;
- long: about ``--long-chars`` characters of prose from a random place of the corpus, then a
  question: mostly text the cache has not seen (a new upload);
- fresh: ``--fresh-words`` random corpus words (nothing cached, nothing found later): new store
  entries.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sparsex.server.cli import parse_memory

TENANT_KEYS = {"key-tenant-a": "a", "key-tenant-b": "b"}
"""The benchmark server's API keys -> tenants."""
KEY_OF = {tenant: key for key, tenant in TENANT_KEYS.items()}
SYSTEM = "You answer questions using only the text the user provides."
QUESTIONS = ("What is this about?", "Summarize it in one sentence.", "Name one fact it states.",
             "What would a beginner find hard here?", "Which part is the most technical?")


@dataclass
class Sent:
    """One request as the client saw it.

    tenant, kind: who sent it and its prompt class (``short``, ``long``, ``fresh``).
    arrival_s: when it was due, from the run's start (open loop: its Poisson arrival time).
    send_lag_s: how late the client sent it after ``arrival_s`` (client threads busy).
    ttft_s / latency_s: from ``arrival_s`` to the first / last token; None if it failed.
    status: HTTP status (200, 429, ...), 0 for a connection error or a timeout.
    """

    tenant: str
    kind: str
    arrival_s: float
    send_lag_s: float = 0.0
    ttft_s: float | None = None
    latency_s: float | None = None
    status: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


class Prompts:
    """The benchmark's prompts, from a seeded document pool (see the module doc)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from sparsex.lab.workloads import passages, vocabulary

        self.pool = passages(args.doc_chars // 2, args.doc_chars, args.seed)[: args.pool]
        self.prose = passages(1000, 2000, args.seed + 1)
        self.words = vocabulary()
        self.short_docs = min(args.short_docs, len(self.pool))
        self.long_chars = args.long_chars
        self.fresh_words = args.fresh_words

    def messages(self, kind: str, rng: random.Random) -> list[dict[str, Any]]:
        if kind == "short":
            parts = [p + "\n\n" for p in rng.sample(self.pool, self.short_docs)]
        elif kind == "long":  # consecutive passages from a random one on, cut to long_chars
            start = rng.randrange(len(self.prose))
            text = ""
            for i in range(len(self.prose)):
                text += self.prose[(start + i) % len(self.prose)] + "\n\n"
                if len(text) >= self.long_chars:
                    break
            parts = [text[: self.long_chars]]
        elif kind == "fresh":
            parts = [" ".join(rng.choices(self.words, k=self.fresh_words))]
        else:
            raise ValueError(f"unknown prompt kind {kind!r}")
        content = [{"type": "text", "text": t} for t in parts] + [{"type": "text", "text": rng.choice(QUESTIONS)}]
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The engine, server and prompt options both load benchmarks share."""
    p.add_argument("--model", default=None, help="alias, .gguf file or model folder (default: smollm2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-cache-memory", type=parse_memory, default=None, help="bytes (512M) or a fraction")
    p.add_argument("--max-queue", type=int, default=256, help="server queue limit (429 beyond)")
    p.add_argument("--reuse", default="blend", help="reuse method of every request")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per request")
    p.add_argument("--doc-chars", type=int, default=600, help="longest pool document, in characters")
    p.add_argument("--pool", type=int, default=24, help="documents in the shared pool")
    p.add_argument("--short-docs", type=int, default=2, help="pool documents per short prompt")
    p.add_argument("--long-chars", type=int, default=6000, help="characters of a long prompt's text")
    p.add_argument("--fresh-words", type=int, default=150, help="random words of a fresh prompt")
    p.add_argument("--seed", type=int, default=0)


@contextmanager
def serving(args: argparse.Namespace, max_prefill_tokens: int | None, **llm_kwargs: Any) -> Iterator[tuple[Any, str]]:
    """A fresh engine behind an in-process server with the two tenants' keys: ``(llm, base_url)``."""
    from sparsex import LLM
    from sparsex.server.app import create_app
    from sparsex.server.auth import Tenants
    from sparsex.server.background import BackgroundServer

    if args.kv_cache_memory is not None:
        llm_kwargs["kv_cache_memory"] = args.kv_cache_memory
    llm = LLM(model=args.model, device=args.device, max_prefill_tokens=max_prefill_tokens, **llm_kwargs)
    app = create_app(llm, tenants=Tenants.from_keys(TENANT_KEYS), max_queue=args.max_queue,
                     default_max_tokens=args.max_tokens)
    try:
        with BackgroundServer(app) as server:
            yield llm, server.base_url
    finally:
        llm.close()


def clients(base_url: str) -> dict[str, Any]:
    """One openai client per tenant, each with its key; no retries. (The openai client's own
    connection pool allows 1,000 connections, more than ``--max-inflight``'s default.)"""
    import openai

    return {tenant: openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=3600)
            for tenant, key in KEY_OF.items()}


def send(client: Any, model: str, messages: list[dict[str, Any]], sent: Sent, t0: float, args: argparse.Namespace) -> Sent:
    """Stream one chat completion; fills ``sent`` (times from ``t0 + sent.arrival_s``), never raises."""
    import openai

    due = t0 + sent.arrival_s
    sent.send_lag_s = max(0.0, time.perf_counter() - due)
    try:
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"sparsex": {"reuse": args.reuse}})
        for chunk in stream:
            if sent.ttft_s is None and chunk.choices:
                sent.ttft_s = time.perf_counter() - due
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
                sent.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                sent.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        sent.latency_s = time.perf_counter() - due
        sent.status = 200
    except openai.APIStatusError as e:
        sent.status, sent.error, sent.ttft_s = e.status_code, f"{type(e).__name__}: {e}"[:240], None
    except Exception as e:  # a connection error or timeout: counted, never fatal to the run
        sent.status, sent.error, sent.ttft_s = 0, f"{type(e).__name__}: {e}"[:240], None
    return sent
