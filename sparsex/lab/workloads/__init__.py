"""Workloads for measuring how well KV-reuse methods approximate full prefill.

Pure Python (no torch, numpy or transformers). Each :class:`WorkItem` holds
warm-up prompts that put its segments into the cache, a test prompt in which
those segments reappear in a new order or context, and an optional expected
answer. Text comes from CPython's bundled help topics (:func:`passages`).

>>> items = make_workload("rag", n=2, seed=0, doc_tokens=100, num_docs=4)
>>> describe(items[0])["prompt_segments"] >= 3
True
"""

from __future__ import annotations

from sparsex.lab.workloads.corpus import Passage, passage_records, passages, vocabulary
from sparsex.lab.workloads.item import (
    Part,
    WorkItem,
    answer_found,
    describe,
    prompt_text,
    reused_segments,
    segments_of,
)
from sparsex.lab.workloads.make import ANSWERABLE, DEFAULT_SIZES, WORKLOADS, make_workload

__all__ = [
    "ANSWERABLE",
    "DEFAULT_SIZES",
    "WORKLOADS",
    "Part",
    "Passage",
    "WorkItem",
    "answer_found",
    "describe",
    "make_workload",
    "passage_records",
    "passages",
    "prompt_text",
    "reused_segments",
    "segments_of",
    "vocabulary",
]
