"""Answer F1 of the real benchmarks (pure Python).

MuSiQue is scored the way CacheBlend's example scores it: the first line of the generation (a
leading "Yes"/"No" reduced to that word), lower-cased, punctuation and articles removed, then the
bag-of-units F1 against each gold answer, the best one kept. The units are the model's tokens of
the normalized text for MuSiQue (CacheBlend counts tokens), words for LoCoMo (the usual SQuAD-style
F1).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

Units = Callable[[str], Sequence[object]]
"""Splits a normalized answer into the units the F1 counts (words, or a tokenizer's ids)."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_answer(generation: str) -> str:
    """The answer part of a generation: its first non-empty line, a leading yes/no as that word."""
    line = generation.lstrip("\n").split("\n")[0]
    words = line.split()
    if line.startswith(("Yes", "yes")):
        return "Yes"
    if words and words[0].startswith(("No", "no")):
        return "No"
    return line


def f1_score(prediction: str, gold: str, units: Units = str.split) -> float:
    """Bag-of-units F1 of one prediction against one gold answer (both normalized first).

    Two empty answers agree (1.0); one empty answer against a non-empty one scores 0."""
    pred, ref = list(units(normalize_answer(prediction))), list(units(normalize_answer(gold)))
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_f1(generation: str, answers: Sequence[str], units: Units = str.split) -> float:
    """The best F1 of the generation's answer part over the gold ``answers`` (0 when there are none)."""
    answer = first_answer(generation)
    return max((f1_score(answer, gold, units) for gold in answers), default=0.0)
