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


def _metaspace_tokenizer() -> object:
    """A SentencePiece-style tokenizer (a leading space is part of a token, dropped at the start)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([v for _, v in sorted(topics.items())][:20],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    return tok


def test_incremental_text_equals_a_full_decode_at_every_step(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """Byte-level BPE (split UTF-8 characters) and SentencePiece-style (leading spaces)."""
    from sparsex.detokenize import IncrementalText
    from sparsex.tokenizer import Tokenizer

    byte_level = Tokenizer(tiny_model_dir("llama"))
    metaspace = _metaspace_tokenizer()
    text = "Café déjà vu: naïve façade, 東京 and emoji 🎉 at the end. Then plain words follow here."
    for encode, decode in (
        (byte_level.encode, byte_level.decode),
        (lambda t: metaspace.encode(t).ids, lambda ids: metaspace.decode(ids)),  # type: ignore[attr-defined]
    ):
        ids = encode(text)
        inc = IncrementalText()
        for n in range(1, len(ids) + 1):
            assert inc.text_of(ids[:n], decode) == decode(ids[:n]), n
        assert inc.text_of(ids, decode) == decode(ids)
