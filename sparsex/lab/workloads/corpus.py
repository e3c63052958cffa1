"""Real English text available offline: CPython's bundled help topics.

``pydoc_data.topics.topics`` maps ~80 topic names to long help texts (the
language reference). Only prose paragraphs are kept: headings, grammar
rules, code samples and ``>>>`` sessions are dropped, hard line breaks are
joined. :func:`passages` cuts the prose into passages of a chosen length,
on paragraph and sentence boundaries where possible, and returns them in a
seed-determined order.

The text depends on the Python version (each release ships its own help
topics), so passages are deterministic for a given interpreter, not across
Python versions.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

_BLOCK_SPLIT = re.compile(r"\n[ \t]*\n")
_UNDERLINE = re.compile(r"[*=~^-]+")
_WORDY = re.compile(r"^[\"“(*]?[A-Za-z][A-Za-z'’,.;:()\-\"”*]*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"”)]?\s+(?=[A-Z\"“(*0-9])")
_WORD = re.compile(r"(?<![\w\"'.])[a-z]{4,9}(?![\w\"'(])")


@dataclass(frozen=True)
class Passage:
    """A passage of real text cut from one or more consecutive help topics."""

    text: str
    """The passage: sentences joined by spaces, paragraphs by a blank line."""
    topic: str
    """The ``pydoc_data`` topic key where the passage starts (e.g. ``"if"``)."""


@dataclass(frozen=True)
class _Unit:
    """One sentence (or a word-boundary piece of a long sentence) of the corpus."""

    text: str
    """The sentence text, without surrounding whitespace."""
    topic: str
    """The topic key it comes from."""
    new_paragraph: bool
    """Whether it starts a paragraph."""


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return dict(topics)


def topic_title(topic: str) -> str:
    """The heading of a help topic (its first line), e.g. ``'The "if" statement'``."""
    text = _topics().get(topic, "")
    first = text.strip().split("\n", 1)[0].strip()
    return first or topic.replace("-", " ")


def _is_prose(block: str) -> bool:
    lines = block.strip("\n").split("\n")
    if len(lines) >= 2 and _UNDERLINE.fullmatch(lines[1].strip()):
        return False  # a heading
    tokens = block.split()
    if len(tokens) < 8:
        return False
    text = " ".join(tokens)
    if ">>>" in text or "::=" in text or text[-1] not in ".?!)":
        return False
    wordy = sum(1 for tok in tokens if _WORDY.match(tok))
    return wordy >= 0.75 * len(tokens)


@functools.lru_cache(maxsize=1)
def _paragraphs() -> tuple[tuple[str, str], ...]:
    """All prose paragraphs as ``(topic, text)``, topics in sorted order."""
    out: list[tuple[str, str]] = []
    topics = _topics()
    for topic in sorted(topics):
        for block in _BLOCK_SPLIT.split(topics[topic]):
            if _is_prose(block):
                joined = re.sub(r"(?<=[a-z])-\n\s*(?=[a-z])", "-", block)
                out.append((topic, " ".join(joined.split())))
    return tuple(out)


def split_sentences(text: str) -> list[str]:
    """Split a passage into sentences (a simple punctuation rule, good enough for prose)."""
    pieces: list[str] = []
    for paragraph in text.split("\n\n"):
        pieces.extend(s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip())
    return pieces


@functools.lru_cache(maxsize=1)
def _sentences() -> tuple[_Unit, ...]:
    units: list[_Unit] = []
    for topic, paragraph in _paragraphs():
        for j, sentence in enumerate(split_sentences(paragraph)):
            units.append(_Unit(sentence, topic, j == 0))
    return tuple(units)


def _word_pieces(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` at spaces into pieces of at most ``max_chars`` (a longer word is cut hard)."""
    pieces: list[str] = []
    current = ""
    for word in text.split(" "):
        while len(word) > max_chars:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(word[:max_chars])
            word = word[max_chars:]
        if not word:
            continue
        if current and len(current) + 1 + len(word) > max_chars:
            pieces.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        pieces.append(current)
    return pieces


@functools.lru_cache(maxsize=16)
def _cut(min_chars: int, max_chars: int) -> tuple[Passage, ...]:
    """All passages of ``min_chars..max_chars`` characters, in corpus order."""
    target = (min_chars + max_chars) // 2
    out: list[Passage] = []
    text, topic = "", ""

    def emit() -> None:
        nonlocal text
        out.append(Passage(text, topic))
        text = ""

    for unit in _sentences():
        pieces = [unit.text] if len(unit.text) <= max_chars else _word_pieces(unit.text, max_chars)
        for k, piece in enumerate(pieces):
            starts_paragraph = unit.new_paragraph and k == 0
            if text and len(text) >= min_chars:
                if unit.topic != topic and starts_paragraph:
                    emit()  # prefer to end a passage where a topic ends
                elif starts_paragraph and len(text) >= target:
                    emit()  # then where a paragraph ends
            sep = "\n\n" if starts_paragraph else " "
            if text and len(text) + len(sep) + len(piece) > max_chars:
                if len(text) < min_chars:  # top up to min_chars with leading words of the piece
                    words = piece.split(" ")
                    while words and len(text) < min_chars:
                        text = f"{text}{sep}{words.pop(0)}"
                        sep = " "
                    piece = " ".join(words)
                emit()
                if not piece:
                    continue
            if not text:
                text, topic = piece, unit.topic
            else:
                text = f"{text}{sep}{piece}"
    if len(text) >= min_chars:
        emit()
    return tuple(p for p in out if min_chars <= len(p.text) <= max_chars)


def passage_records(min_chars: int, max_chars: int, seed: int) -> list[Passage]:
    """Passages with their topics, in an order determined by ``seed``."""
    if min_chars < 1 or max_chars < min_chars:
        raise ValueError(f"need 1 <= min_chars <= max_chars, got {min_chars}, {max_chars}")
    records = list(_cut(min_chars, max_chars))
    random.Random(f"sparsex-passages:{seed}").shuffle(records)
    return records


def passages(min_chars: int, max_chars: int, seed: int) -> list[str]:
    """Deterministic passages of real prose, each ``min_chars..max_chars`` characters long.

    Passages are cut on paragraph, then sentence boundaries (on word
    boundaries only when a single sentence is longer than ``max_chars`` or a
    passage must be topped up to ``min_chars``); ``seed`` fixes their order.
    The count depends on the length: about 280 passages of ~1200 characters.
    """
    return [p.text for p in passage_records(min_chars, max_chars, seed)]


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Distinct lower-case words (4–9 letters) of the corpus prose, sorted."""
    words: set[str] = set()
    for _, paragraph in _paragraphs():
        words.update(_WORD.findall(paragraph))
    return tuple(sorted(words))
