"""RULER-style retrieval over reused segments: needle (passkey) and variable tracking.

The haystack is ``num_docs`` passages, each a segment. Warm-up: each
passage alone (so its KV never saw the others). Test: all passages in a new
order, separated by blank lines, then the question.

- needle: a pass-key sentence hidden in one passage; answer = the key.
- vartrack: a chain of assignments spread ACROSS segments, in test-prompt
  order: ``VAR QXABC = 12345.`` in one segment, ``VAR BYDEF = VAR QXABC.``
  in a later one, ... A shorter distractor chain with another value runs
  through the same haystack. The question asks which variables hold the
  chain's value; the answer is the LAST name of the chain (the one that
  needs every hop to be followed). A warm-up prompt holds at most one link,
  so information must flow between segments.
"""

from __future__ import annotations

import random

from sparsex.lab.workloads.common import (
    Params,
    doc_pool,
    frame,
    insert_many,
    insert_sentence,
    new_order,
    pick,
    random_names,
    random_number,
)
from sparsex.lab.workloads.item import Part
from sparsex.segments import Segment

WARM_SYSTEM = "Read the following text."
MAX_CHAIN = 5

Built = tuple[list[list[Part]], list[Part], str | None]


def _haystack(
    rng: random.Random, params: Params, texts: list[str], test_system: str, question: str, lead: str
) -> tuple[list[list[Part]], list[Part]]:
    """Warm-up (each text alone) and test prompt (texts in ``texts`` order, already shuffled)."""
    segs = [Segment(t) for t in texts]
    warm_order = new_order(rng, len(segs))  # warm-up runs them in another order than the test
    warmup = [frame(params.markup, WARM_SYSTEM, [segs[j]], "Summarize the text.") for j in warm_order]
    body: list[Part] = []
    for pos, seg in enumerate(segs):
        body.extend(["\n\n" if pos else "", seg])
    return warmup, frame(params.markup, test_system, body, question, lead)


def build_needle(rng: random.Random, params: Params, seed: int) -> Built:
    """One needle item; the answer is a 7-digit pass key."""
    texts = [r.text for r in pick(rng, doc_pool(params, seed), params.num_docs)]
    key = random_number(rng, 7)
    where = rng.randrange(len(texts))
    texts[where] = insert_sentence(rng, texts[where], f"The special pass key is {key}.")
    system = (
        "A special pass key is hidden in the following text. Memorize it; "
        "you will be asked for it afterwards."
    )
    question = "Question: What is the special pass key mentioned in the text?"
    warmup, prompt = _haystack(rng, params, texts, system, question, "The special pass key is")
    return warmup, prompt, key


def _chain_positions(rng: random.Random, n_segments: int, length: int) -> list[int]:
    return sorted(rng.sample(range(n_segments), length))


def build_vartrack(rng: random.Random, params: Params, seed: int) -> Built:
    """One variable-tracking item; the answer is the last variable of the chain."""
    n = params.num_docs
    if n < 2:
        raise ValueError("vartrack needs num_docs >= 2 segments")
    texts = [r.text for r in pick(rng, doc_pool(params, seed), n)]
    length = min(n, MAX_CHAIN)
    decoy_length = min(n, max(2, length - 2))
    names = random_names(rng, length + decoy_length)
    value, decoy_value = random_number(rng, 5), random_number(rng, 5)
    while decoy_value == value:
        decoy_value = random_number(rng, 5)

    inserts: list[list[str]] = [[] for _ in range(n)]
    for chain, first_value in ((names[:length], value), (names[length:], decoy_value)):
        for hop, pos in enumerate(_chain_positions(rng, n, len(chain))):
            rhs = first_value if hop == 0 else f"VAR {chain[hop - 1]}"
            inserts[pos].append(f"VAR {chain[hop]} = {rhs}.")
    for pos in range(n):
        rng.shuffle(inserts[pos])  # the two chains' links are independent inside one segment
        texts[pos] = insert_many(rng, texts[pos], inserts[pos])

    system = (
        "Memorize and track the chain(s) of variable assignments hidden in the following text; "
        "a variable can take the value of another variable."
    )
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    lead = (
        f"According to the chain of variable assignments in the text above, {length} variables "
        f"are assigned the value {value}; they are:"
    )
    warmup, prompt = _haystack(rng, params, texts, system, question, lead)
    return warmup, prompt, names[length - 1]
