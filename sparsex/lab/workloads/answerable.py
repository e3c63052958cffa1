"""Answerable tasks on real text that the default 135M model solves with a full prefill (its
RULER-style scores are near zero even then, so accuracy there says nothing).

Short passages (``Params.doc_tokens``; the CLI uses ~80 tokens and 4 documents for these kinds),
each a segment. Warm-up: each document alone after a reading instruction. Test: the documents in a
new order behind numbered plain-text headers, then an explicit question, and the answer's lead-in
(``"The access code for the north gate is"``) so that the next tokens are the answer.

- lookup: one fact planted in one document ("The access code for the north gate is 4172.").
  Answer: the code.
- combine: the answer needs two documents: one says which entrance a group must use ("Visitors
  from the harbor must use the north gate."), another that entrance's code ("The access code for
  the north gate is 4172."), and a third another entrance's code. The question asks to name the
  entrance, then give its code; the lead-in names the group ("Visitors from the harbor must use
  the"). Answer: the code.

Full-prefill accuracy of the 135M model (n = 8, seed 0, 80-token documents, 4 of them): lookup
8 of 8; combine 6 of 8 (it names the right entrance almost every time; the misses give no code or
the other entrance's). Formats that did not reach 70% and were dropped: combine without "name the
entrance, then give its code" 5 of 8; two codes asked together 0 of 2 (it repeats the first); a
code plus a password 0 of 4; a key-cabinet-room chain with a distractor cabinet 2 of 6 (chance);
lookup with a code in every document 5 of 8.
"""

from __future__ import annotations

import random

from sparsex.lab.workloads.common import Params, doc_pool, frame, insert_sentence, new_order, pick
from sparsex.lab.workloads.item import Part
from sparsex.segments import Segment

Built = tuple[list[list[Part]], list[Part], str | None]

WARM_SYSTEM = "Read the following document carefully."
TEST_SYSTEM = "Answer the question using only the documents below."
PLACES = (
    "north gate", "south gate", "east warehouse", "west tower", "river lab", "old library",
    "main hangar", "harbor office", "glass house", "lower vault", "signal room", "garden shed",
)  # fmt: skip
GROUPS = ("the harbor", "the north farms", "the city archive", "the river school", "the night shift", "the old mill")


def _numbered(docs: list[Segment], order: list[int]) -> list[Part]:
    body: list[Part] = []
    for pos, j in enumerate(order):
        body.extend(["\n\n" if pos else "", f"Document {pos + 1}:\n", docs[j]])
    return body


def _item(rng: random.Random, params: Params, texts: list[str], question: str, lead: str) -> tuple[
    list[list[Part]], list[Part]
]:
    docs = [Segment(t) for t in texts]
    warmup = [frame(params.markup, WARM_SYSTEM, ["Document:\n", d], "Summarize the document.") for d in docs]
    body = _numbered(docs, new_order(rng, len(docs)))
    return warmup, frame(params.markup, TEST_SYSTEM, body, question, lead)


def _unused_numbers(rng: random.Random, lo: int, hi: int, count: int, texts: list[str]) -> list[str]:
    """``count`` distinct numbers in ``[lo, hi]`` that occur in none of ``texts`` (so an answer in
    the continuation can only have come from the planted sentence)."""
    out: list[str] = []
    while len(out) < count:
        n = str(rng.randint(lo, hi))
        if n not in out and not any(n in t for t in texts):
            out.append(n)
    return out


def build_lookup(rng: random.Random, params: Params, seed: int) -> Built:
    """One lookup item: ``(warmup, prompt, answer)``; the answer is a 4-digit access code."""
    texts = [r.text for r in pick(rng, doc_pool(params, seed), params.num_docs)]
    place, (code,) = rng.choice(PLACES), _unused_numbers(rng, 1000, 9999, 1, texts)
    target = rng.randrange(len(texts))
    texts[target] = insert_sentence(rng, texts[target], f"The access code for the {place} is {code}.")
    question = f"Question: What is the access code for the {place}? Reply with the code only."
    warmup, prompt = _item(rng, params, texts, question, f"The access code for the {place} is")
    return warmup, prompt, code


def build_combine(rng: random.Random, params: Params, seed: int) -> Built:
    """One combine item: ``(warmup, prompt, answer)``; the answer is the access code of the entrance
    a group must use: which entrance is in one document, its code in another, and a third document
    gives another entrance's code."""
    if params.num_docs < 3:
        raise ValueError("combine needs at least 3 documents")
    texts = [r.text for r in pick(rng, doc_pool(params, seed), params.num_docs)]
    place, other = rng.sample(PLACES, 2)
    group = rng.choice(GROUPS)
    code, other_code = _unused_numbers(rng, 1000, 9999, 2, texts)
    route, fact, distractor = rng.sample(range(len(texts)), 3)
    texts[route] = insert_sentence(rng, texts[route], f"Visitors from {group} must use the {place}.")
    texts[fact] = insert_sentence(rng, texts[fact], f"The access code for the {place} is {code}.")
    texts[distractor] = insert_sentence(rng, texts[distractor], f"The access code for the {other} is {other_code}.")
    question = (f"Question: Visitors from {group} must use one entrance. Which entrance is it, and what is its "
                "access code? Name the entrance, then give its access code.")
    warmup, prompt = _item(rng, params, texts, question, f"Visitors from {group} must use the")
    return warmup, prompt, code
