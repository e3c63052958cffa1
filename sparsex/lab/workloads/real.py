"""The real benchmarks by workload name: CacheBlend's MuSiQue and LoCoMo, each sent two ways.

    musique        MuSiQue, CacheBlend's protocol, one plain string (a completion request)
    musique-chat   the same text as one user message through the chat template
    locomo         LoCoMo questions over earlier sessions, as chat messages
    locomo-plain   the same as one plain string

They read the original files from a folder (``--data DIR``); ``split`` is the data README's
(tune: MuSiQue items 0-49, LoCoMo conversations 0-2; report: items 50-99, conversations 3-5).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sparsex.lab.workloads.item import WorkItem
from sparsex.lab.workloads.locomo import DEFAULT_MAX_TOKENS, locomo_items
from sparsex.lab.workloads.musique import musique_items

REAL_WORKLOADS = ("musique", "musique-chat", "locomo", "locomo-plain")
"""Workload names of the real benchmarks."""


def real_workload(
    kind: str, data_dir: str | Path, split: str, n: int | None, *,
    count_tokens: Callable[[str], int] | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
) -> list[WorkItem]:
    """The first ``n`` items of real workload ``kind`` on ``split`` (LoCoMo prompts stay within
    ``max_tokens`` by ``count_tokens``, the model's token count)."""
    if kind == "musique":
        return musique_items(data_dir, split, n, "plain")
    if kind == "musique-chat":
        return musique_items(data_dir, split, n, "chat")
    if kind in ("locomo", "locomo-plain"):
        sending = "chat" if kind == "locomo" else "plain"
        return locomo_items(data_dir, split, n, sending, max_tokens, count_tokens)
    raise ValueError(f"unknown real workload {kind!r}; choose from {', '.join(REAL_WORKLOADS)}")
