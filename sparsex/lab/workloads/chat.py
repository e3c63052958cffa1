"""Multi-round chat with memory: an earlier session re-inserted, trimmed, under a new system prompt.

Every message is a segment; role markers are plain text around it. The
earlier session has ``num_docs`` exchanges (a short user question about a
help topic, an assistant answer of about ``doc_tokens`` tokens). Warm-up: that
session as one prompt. Test, cycling over item indices:

- ``window``: same system prompt, the oldest exchanges dropped (sliding window);
- ``system``: all exchanges kept, the system prompt changed (a new date);
- ``both``: window and new system prompt.

then a new user question. When answerable, a user turn that stays in the
window mentions a code name, and the new question asks for it.
"""

from __future__ import annotations

import random

from sparsex.lab.workloads.common import Markup, Params, doc_pool, merge, pick, random_code
from sparsex.lab.workloads.corpus import topic_title
from sparsex.lab.workloads.item import Part
from sparsex.segments import Segment

VARIANTS = ("window", "system", "both")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
OPENERS = (
    "Can you explain {}?",
    "What should I know about {}?",
    "Tell me more about {}.",
    "Please describe {}.",
)


def _system(day: str) -> str:
    return f"You are a helpful assistant who answers questions about Python. Today is {day}."


def _conversation(markup: Markup, system: str, turns: list[tuple[str, Segment]]) -> list[Part]:
    """System text, then the turns (the first one is the user's, opened by ``markup.system``)."""
    parts: list[Part] = [markup.system(system)]
    for j, (role, seg) in enumerate(turns):
        parts.extend(["" if j == 0 else markup.open(role), seg, markup.close()])
    return merge(parts)


def build_chat(
    rng: random.Random, params: Params, seed: int, index: int
) -> tuple[list[list[Part]], list[Part], str | None]:
    """One chat item: ``(warmup, prompt, answer)``; the answer is a code name from a kept turn."""
    if params.num_docs < 2:
        raise ValueError("chat needs num_docs >= 2 exchanges")
    variant = VARIANTS[index % len(VARIANTS)]
    n = params.num_docs
    drop = 0 if variant == "system" else rng.randint(1, max(1, n // 3))
    records = pick(rng, doc_pool(params, seed), n)
    questions = [rng.choice(OPENERS).format(topic_title(r.topic)) for r in records]

    answer: str | None = None
    if params.answerable:
        answer = random_code(rng)
        j = rng.randrange(drop, n)
        questions[j] += f" By the way, the code name of my project is {answer}; please remember it."
        new_question = "What is the code name of my project?"
    else:
        new_question = (
            f"Going back to {topic_title(records[rng.randrange(drop, n)].topic)}: can you summarize it?"
        )

    turns: list[tuple[str, Segment]] = []
    for question, record in zip(questions, records, strict=True):
        turns.extend([("user", Segment(question)), ("assistant", Segment(record.text))])

    day_a, day_b = rng.sample(DAYS, 2)
    markup = params.markup
    warmup = [_conversation(markup, _system(day_a), turns)]
    system_b = _system(day_a if variant == "window" else day_b)
    prompt = _conversation(markup, system_b, turns[2 * drop :])
    prompt = merge([*prompt, markup.open("user"), new_question, markup.close(), markup.reply()])
    return warmup, prompt, answer
