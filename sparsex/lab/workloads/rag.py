"""RAG: the same documents in new orders and combinations, behind a question.

Warm-up: each document alone, after a short reading instruction. Test: a
subset of the documents (at least two thirds, always including the one that
holds the planted fact) in a new order, numbered by plain-text headers,
then a question about one of them.
"""

from __future__ import annotations

import random

from sparsex.lab.workloads.common import (
    Params,
    doc_pool,
    frame,
    insert_sentence,
    new_order,
    pick,
    random_code,
)
from sparsex.lab.workloads.corpus import topic_title
from sparsex.lab.workloads.item import Part
from sparsex.segments import Segment

WARM_SYSTEM = "Read the following document carefully."
TEST_SYSTEM = "Answer the question using only the documents below."
PROJECTS = (
    "Aurora", "Basalt", "Cobalt", "Driftwood", "Ember", "Falcon", "Glacier", "Harbor",
    "Indigo", "Juniper", "Kestrel", "Lantern", "Meridian", "Nimbus", "Orchid", "Quartz",
)  # fmt: skip


def build_rag(
    rng: random.Random, params: Params, seed: int
) -> tuple[list[list[Part]], list[Part], str | None]:
    """One RAG item: ``(warmup, prompt, answer)``; the answer is a planted archive code."""
    records = pick(rng, doc_pool(params, seed), params.num_docs)
    texts = [r.text for r in records]
    target = rng.randrange(len(texts))
    answer: str | None = None
    if params.answerable:
        project, answer = rng.choice(PROJECTS), random_code(rng)
        fact = f"The archive code of the {project} project is {answer}."
        texts[target] = insert_sentence(rng, texts[target], fact)
        question = f"Question: According to the documents, what is the archive code of the {project} project?"
    else:
        title = topic_title(records[target].topic)
        question = f"Question: According to the documents, what is said about {title}?"
    docs = [Segment(t) for t in texts]

    warmup = [
        frame(params.markup, WARM_SYSTEM, ["Document:\n", doc], "Summarize the document.") for doc in docs
    ]

    n = len(docs)
    keep = n - rng.randint(0, n // 3)
    others = [j for j in range(n) if j != target]
    chosen = [target, *rng.sample(others, keep - 1)]
    order = new_order(rng, len(chosen))
    body: list[Part] = []
    for pos, j in enumerate(order):
        body.extend(["\n\n" if pos else "", f"Document {pos + 1}:\n", docs[chosen[j]]])
    return warmup, frame(params.markup, TEST_SYSTEM, body, question), answer
