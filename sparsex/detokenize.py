"""The one detokenizing stream cursor: which part of a growing text is safe to send (pure Python).

A request's text is re-decoded from all its tokens after every step, so its tail can still change:

    text so far:   "The answer is 4" + "2" + "\ufffd"
                    └──── sent ────┘   └ held back ┘
                    a stop string ("42!" say) may still be completing in the last len(stop) - 1
                    characters, and U+FFFD is a UTF-8 character whose bytes are split across tokens

``TextCursor`` returns only text that can no longer change, so text already streamed never has to
be taken back. Used by the HTTP server's SSE streams (and by ``LLM.stream``).
"""

from __future__ import annotations

from collections.abc import Sequence

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
