"""The workload item: warm-up prompts, a test prompt, an optional answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from sparsex.segments import Segment

Part: TypeAlias = str | Segment
"""One part of a prompt: plain text, or a reusable segment."""


@dataclass(frozen=True)
class Chat:
    """A prompt sent as chat messages, the way a client of a chat API sends it: rendered at run time
    by the model's chat template (every message a segment, as the server does), or, for a model
    without one, by the lab's markup for it."""

    messages: tuple[tuple[str, str], ...]
    """``(role, content)`` pairs in order; roles ``system``, ``user``, ``assistant``."""

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


Prompt: TypeAlias = list[Part] | Chat
"""A work item's prompt: parts (plain text and segments) or chat messages."""


def answer_found(answer: str, text: str) -> bool:
    """The expected answer occurs in ``text`` (case-insensitive)."""
    return answer.lower() in text.lower()


@dataclass
class WorkItem:
    """One measurement: run ``warmup`` first (to cache the segments), then ``prompt``.

    Every segment of ``prompt`` occurs in at least one warm-up prompt with
    the same text (so a KV-reuse method can serve it from the cache) but
    after different preceding text, i.e. with its KV computed in another
    context and usually at another position.
    """

    name: str
    """Unique within a workload, ``"{kind}-{index}"`` (e.g. ``"rag-3"``)."""
    warmup: list[Prompt]
    """Prompts to run first, in order, so that the reused segments are cached."""
    prompt: Prompt
    """The test prompt; it ends with plain text (the question or instruction)."""
    answer: str | None
    """Expected answer substring of the continuation (a code, key, variable or word), else None."""
    kind: str
    """The scenario: ``"rag"``, ``"chat"``, ``"agents"``, ``"needle"``, ``"vartrack"``, ``"cwe"``,
    ``"fwe"``, ``"lookup"``, ``"combine"``, or a real benchmark (``"musique"``, ``"locomo"``, ...)."""
    answers: tuple[str, ...] = ()
    """Gold answers of a real benchmark's question, scored by token F1 (``scoring.py``)."""
    f1_units: str = "words"
    """What the F1 counts: ``"words"`` (normalized words) or ``"tokens"`` (the model's tokens of
    the normalized text, as CacheBlend's MuSiQue scorer does)."""


def part_text(part: Part) -> str:
    """The text of a part (segments built here always hold text)."""
    if isinstance(part, Segment):
        if not isinstance(part.content, str):
            raise TypeError("workload segments hold text, not token ids")
        return part.content
    return part


def prompt_text(prompt: Sequence[Part] | Chat) -> str:
    """The prompt as one string: the concatenation of its parts (of a chat: its contents)."""
    if isinstance(prompt, Chat):
        return "".join(content for _, content in prompt.messages)
    return "".join(part_text(p) for p in prompt)


def segments_of(prompt: Sequence[Part] | Chat) -> list[Segment]:
    """The segments of a prompt, in order (of a chat: one per message with text)."""
    if isinstance(prompt, Chat):
        return [Segment(content) for _, content in prompt.messages if content]
    return [p for p in prompt if isinstance(p, Segment)]


def reused_segments(item: WorkItem) -> list[Segment]:
    """Segments of the test prompt that also occur in a warm-up prompt, in prompt order."""
    warm = {s for prompt in item.warmup for s in segments_of(prompt)}
    return [s for s in segments_of(item.prompt) if s in warm]


def describe(item: WorkItem) -> dict[str, int | str]:
    """Sizes of an item: counts of prompts, parts and segments, and characters.

    ``approx_tokens`` assumes ~4 characters per token.
    """
    segments = segments_of(item.prompt)
    reused = reused_segments(item)
    prompt_chars = len(prompt_text(item.prompt))
    segment_chars = sum(len(part_text(s)) for s in segments)
    return {
        "name": item.name,
        "kind": item.kind,
        "warmup_prompts": len(item.warmup),
        "warmup_segments": sum(len(segments_of(p)) for p in item.warmup),
        "warmup_chars": sum(len(prompt_text(p)) for p in item.warmup),
        "prompt_parts": len(item.prompt.messages) if isinstance(item.prompt, Chat) else len(item.prompt),
        "prompt_segments": len(segments),
        "reused_segments": len(reused),
        "prompt_chars": prompt_chars,
        "segment_chars": segment_chars,
        "reused_chars": sum(len(part_text(s)) for s in reused),
        "plain_chars": prompt_chars - segment_chars,
        "approx_tokens": (prompt_chars + 3) // 4,
    }
