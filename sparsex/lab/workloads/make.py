"""The entry point: ``make_workload(kind, n, seed)``."""

from __future__ import annotations

import random
from collections.abc import Callable

from sparsex.lab.workloads.agents import build_agents
from sparsex.lab.workloads.answerable import build_combine, build_lookup
from sparsex.lab.workloads.chat import build_chat
from sparsex.lab.workloads.common import STYLES, Markup, Params, item_rng
from sparsex.lab.workloads.item import Part, WorkItem
from sparsex.lab.workloads.rag import build_rag
from sparsex.lab.workloads.ruler import build_needle, build_vartrack
from sparsex.lab.workloads.words import build_cwe, build_fwe

WORKLOADS = ("rag", "chat", "agents", "needle", "vartrack", "cwe", "fwe", "lookup", "combine")
"""Every scenario :func:`make_workload` knows."""

ANSWERABLE = ("lookup", "combine")
"""Tasks the default 135M model solves with a full prefill (>= 70%) at their default sizes."""

DEFAULT_SIZES: dict[str, tuple[int, int]] = {"lookup": (80, 4), "combine": (80, 4)}
"""``(doc_tokens, num_docs)`` where a kind needs other sizes than the CLI's general default."""

Builder = Callable[[random.Random, Params, int, int], tuple[list[list[Part]], list[Part], str | None]]

_BUILDERS: dict[str, Builder] = {
    "rag": lambda rng, p, seed, i: build_rag(rng, p, seed),
    "chat": build_chat,
    "agents": lambda rng, p, seed, i: build_agents(rng, p, seed),
    "needle": lambda rng, p, seed, i: build_needle(rng, p, seed),
    "vartrack": lambda rng, p, seed, i: build_vartrack(rng, p, seed),
    "cwe": lambda rng, p, seed, i: build_cwe(rng, p, seed),
    "fwe": lambda rng, p, seed, i: build_fwe(rng, p, seed),
    "lookup": lambda rng, p, seed, i: build_lookup(rng, p, seed),
    "combine": lambda rng, p, seed, i: build_combine(rng, p, seed),
}


def make_workload(
    kind: str,
    n: int,
    seed: int,
    *,
    doc_tokens: int = 300,
    num_docs: int = 6,
    style: str = "plain",
    answerable: bool = True,
) -> list[WorkItem]:
    """``n`` deterministic items of scenario ``kind`` (one of :data:`WORKLOADS`).

    doc_tokens: approximate tokens (~4 characters each) of one reusable part: a document,
        an assistant turn, a shared message, a haystack chunk or word-list chunk.
    num_docs: reusable parts per item: documents (rag), earlier exchanges (chat), haystack
        or word-list segments (needle, vartrack, cwe, fwe); agents always share 3 messages.
        A test prompt is then roughly ``num_docs * doc_tokens`` tokens.
    style: ``"plain"`` role labels / ``Answer:`` cue, or ``"chatml"`` / ``"gemma"`` turn markers.
    answerable: for rag, chat and agents, plant a fact and ask for it (``answer`` set);
        when False those items ask an open question and ``answer`` is None. The RULER kinds
        always have an answer.

    Item ``i`` depends only on ``(kind, seed, i)`` and the sizes, not on ``n``.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown workload {kind!r}; choose from {', '.join(WORKLOADS)}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {', '.join(STYLES)}")
    if n < 0 or doc_tokens < 1 or num_docs < 1:
        raise ValueError("need n >= 0, doc_tokens >= 1 and num_docs >= 1")
    params = Params(doc_tokens=doc_tokens, num_docs=num_docs, markup=Markup(style), answerable=answerable)
    items: list[WorkItem] = []
    for index in range(n):
        warmup, prompt, answer = _BUILDERS[kind](item_rng(kind, seed, index), params, seed, index)
        items.append(WorkItem(f"{kind}-{index}", list(warmup), prompt, answer, kind))
    return items
