"""``sparsex.detokenize.TextCursor``: the one stream cursor (server SSE and ``LLM.stream``)."""

from __future__ import annotations

import subprocess
import sys

from sparsex.detokenize import TextCursor


def test_holds_back_a_possible_stop_string() -> None:
    c = TextCursor(["END"])
    assert c.advance("Hello wor") == "Hello w"  # len("END") - 1 characters wait
    assert c.advance("Hello world") == "or"
    assert c.advance("Hello world!", finished=True) == "ld!"
    assert c.advance("Hello world!", finished=True) == ""


def test_holds_back_a_half_decoded_character() -> None:
    c = TextCursor()
    assert c.advance("caf\ufffd") == "caf"
    assert c.advance("caf\ufffd\ufffd") == ""
    assert c.advance("café") == "é"
    assert c.advance("café \ufffd", finished=True) == " \ufffd"  # at the end, whatever is left


def test_deltas_concatenate_to_the_final_text() -> None:
    texts = ["a", "ab", "ab\ufffd", "abc", "abcSTO", "abcSTOP", "abcSTOPx"]
    c = TextCursor(["STOPPED"])
    out = "".join(c.advance(t) for t in texts) + c.advance("abc", finished=True)
    assert out == "abc"  # the engine cut the stop string from the text: never sent, never taken back


def test_imports_no_torch() -> None:
    code = "import sys, sparsex.detokenize; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
