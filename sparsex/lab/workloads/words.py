"""RULER-style aggregation over reused segments: common and frequent word extraction.

A word list is shuffled and cut into ``num_docs`` segments of about
``doc_tokens`` tokens each; the answer needs counts summed over ALL segments.
Warm-up: each segment alone. Test: the segments in a new order, then the
question.

- cwe: real English words from the corpus vocabulary. One word occurs
  ``top`` times, four "common" words fewer times each, the rest at most
  ``common - 1`` times; answer = the most common word.
- fwe: synthetic coded words (random lowercase letters) with Zipf-like
  counts (the k-th word ~ 1/k), the first strictly most frequent; answer =
  the most frequent coded word. Random letters tokenize at ~1.8 characters
  per token, so fwe is sized by estimated tokens, not by characters: its
  ``describe()["approx_tokens"]`` (characters / 4) reads about half the real count.
"""

from __future__ import annotations

import random
import string

from sparsex.lab.workloads.common import Params, frame, new_order, random_names
from sparsex.lab.workloads.corpus import vocabulary
from sparsex.lab.workloads.item import Part
from sparsex.segments import Segment

WARM_SYSTEM = "Read the following list of words."
CHARS_PER_WORD_CWE = 9  # a 4-9 letter word and ", "
NUM_COMMON = 4
NUM_CODES = 24

Built = tuple[list[list[Part]], list[Part], str | None]


def _total_words(params: Params, chars_per_word: int) -> int:
    return max(params.num_docs * 4, params.num_docs * params.doc_chars // chars_per_word)


def _tokens_per_code(length: int) -> float:
    """BPE tokens of a random ``length``-letter code and its space (measured on SmolLM2: 2.1 at 3, 3.9 at 6)."""
    return 0.6 * length + 0.3


def _chunks(words: list[str], n: int) -> list[list[str]]:
    size, extra = divmod(len(words), n)
    out: list[list[str]] = []
    start = 0
    for j in range(n):
        end = start + size + (1 if j < extra else 0)
        out.append(words[start:end])
        start = end
    return out


def _build(
    rng: random.Random, params: Params, words: list[str], sep: str, system: str, question: str, lead: str
) -> tuple[list[list[Part]], list[Part]]:
    rng.shuffle(words)
    segs = [Segment(sep.join(chunk)) for chunk in _chunks(words, params.num_docs)]
    warmup = [frame(params.markup, WARM_SYSTEM, [seg], "How many words are in the list?") for seg in segs]
    body: list[Part] = []
    for pos, j in enumerate(new_order(rng, len(segs))):
        body.extend(["\n" if pos else "", segs[j]])
    return warmup, frame(params.markup, system, body, question, lead)


def build_cwe(rng: random.Random, params: Params, seed: int) -> Built:
    """One common-word-extraction item; the answer is the single most common word."""
    total = _total_words(params, CHARS_PER_WORD_CWE)
    top = max(3, total // 12)
    common = max(2, top * 2 // 3)
    vocab = list(vocabulary())
    rng.shuffle(vocab)
    answer, commons, fillers = vocab[0], vocab[1 : 1 + NUM_COMMON], vocab[1 + NUM_COMMON :]
    words = [answer] * top + [w for w in commons for _ in range(common)]
    need = max(0, total - len(words))
    cap = common - 1
    if need > cap * len(fillers):
        raise ValueError("cwe: word list too long for the corpus vocabulary; lower doc_tokens or num_docs")
    words.extend(fillers[j % len(fillers)] for j in range(need))  # each filler at most ``cap`` times
    system = "Below are lists of words separated by commas. Some words occur several times."
    question = "Question: What is the most common word in the lists above?"
    warmup, prompt = _build(rng, params, words, ", ", system, question, "The most common word is")
    return warmup, prompt, answer


def build_fwe(rng: random.Random, params: Params, seed: int) -> Built:
    """One frequent-word-extraction item; the answer is the most frequent coded word."""
    length = rng.choice((3, 4, 5, 6))
    total = max(params.num_docs * 4, round(params.num_docs * params.doc_tokens / _tokens_per_code(length)))
    codes = random_names(rng, NUM_CODES, length=length, alphabet=string.ascii_lowercase)
    weights = [1.0 / (k + 1) for k in range(NUM_CODES)]
    scale = total / sum(weights)
    counts = [max(1, round(w * scale)) for w in weights]
    if counts[0] <= counts[1]:
        counts[0] = counts[1] + 1
    words = [c for c, k in zip(codes, counts, strict=True) for _ in range(k)]
    system = "Read the following coded text and track how often each coded word appears."
    question = "Question: What is the most frequently appearing coded word in the text above?"
    warmup, prompt = _build(rng, params, words, " ", system, question, "The most frequent coded word is")
    return warmup, prompt, codes[0]
