"""Prompt parts: plain text / tokens, and reusable segments.

A prompt given to the engine is a string, a list of token ids, or a list of
parts. Each part is either plain (``str`` or ``list[int]``) or a
:class:`Segment`, whose KV cache may be reused wherever it reappears.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

SegmentSource = Literal["explicit", "chat", "auto", "pinned"]


@dataclass(frozen=True)
class Segment:
    """A reusable span of a prompt.

    content: the segment's text, or its token ids.
    namespace: tenant / cache salt; a segment only hits entries of its own namespace.
    """

    content: str | list[int]
    namespace: str = ""


PromptPart = str | list[int] | Segment
Prompt = str | list[int] | Sequence[PromptPart]


@dataclass(frozen=True)
class SegmentSpan:
    """Where a segment sits in a tokenized prompt: tokens ``[start, end)``.

    source: how the boundary was found (explicit part, chat message, automatic chunking).
    namespace: the tenant namespace that salts its hashes.
    """

    start: int
    end: int
    source: SegmentSource
    namespace: str = ""

    @property
    def num_tokens(self) -> int:
        return self.end - self.start
