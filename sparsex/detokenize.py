"""Detokenizing a growing output (pure Python): its text one step at a time, and which part is safe
to send.

``IncrementalText`` gives a request's text after each new token by decoding only a short window.
Its tail can still change:

    text so far:   "The answer is 4" + "2" + "\ufffd"
                    └──── sent ────┘   └ held back ┘
                    a stop string ("42!" say) may still be completing in the last len(stop) - 1
                    characters, and U+FFFD is a UTF-8 character whose bytes are split across tokens

``TextCursor`` returns only text that can no longer change, so text already streamed never has to
be taken back. Used by the HTTP server's SSE streams (and by ``LLM.stream``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class TextCursor:
    """How much of one text has been handed out.

    >>> c = TextCursor(stops=["END"])
    >>> c.advance("Hello wor"), c.advance("Hello world"), c.advance("Hello world!", finished=True)
    ('Hello w', 'or', 'ld!')

    stops: the request's stop strings; the last ``len(longest) - 1`` characters are held back
        while the request runs (the engine cuts a completed stop string from the text).
    sent: characters of the text handed out so far.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = 0

    def advance(self, text: str, finished: bool = False) -> str:
        """The new safe delta of ``text`` (the full text so far); everything left once ``finished``.

        While running, a trailing U+FFFD (a half-decoded character) and the stop-string holdback
        are not sent. ``text`` must extend what was already sent (the engine's text only grows,
        apart from a stop string cut at the end, which was never sent).
        """
        end = len(text) if finished else len(text) - self.hold
        while not finished and end > self.sent and text[end - 1] == REPLACEMENT_CHAR:
            end -= 1
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent : end], end
        return delta


class IncrementalText:
    """The text of a growing token sequence, decoding a few tokens per step instead of all of them.

    Decoding is not additive token by token: a SentencePiece token's leading space depends on what
    precedes it, and a character's UTF-8 bytes can be split across tokens. So each step decodes a
    window that starts where the last committed piece started, and keeps what it adds beyond that
    piece; a window ending in U+FFFD is shown but not committed (vLLM's incremental detokenization)::

        ids        t0 t1 t2 | t3 t4 | t5
                   committed  read    new
                   text       window: decode(t3 t4 t5) minus decode(t3 t4)

    The result equals decoding every token, at every step.
    """

    def __init__(self) -> None:
        self.committed = ""
        self.prefix_offset = 0  # the window starts here
        self.read_offset = 0  # tokens up to here are in ``committed``

    def text_of(self, ids: Sequence[int], decode: Callable[[list[int]], str]) -> str:
        """The text of ``ids`` (the previous call's ids plus new ones)."""
        prefix = decode(list(ids[self.prefix_offset : self.read_offset]))
        window = decode(list(ids[self.prefix_offset :]))
        if not window.startswith(prefix):  # a decoder that rewrites earlier text: start over
            self.committed = decode(list(ids))
            self.prefix_offset, self.read_offset = max(0, len(ids) - 1), len(ids)
            return self.committed
        new = window[len(prefix) :]
        if new and not new.endswith(REPLACEMENT_CHAR):
            self.committed += new
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            return self.committed
        return self.committed + new
