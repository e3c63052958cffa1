"""The offline corpus: deterministic passages of real prose within the requested lengths."""

from __future__ import annotations

import pytest

from sparsex.lab.workloads import passage_records, passages, vocabulary


@pytest.mark.parametrize(("lo", "hi"), [(960, 1440), (200, 300), (40, 60), (4000, 6000)])
def test_passage_lengths_are_within_bounds(lo: int, hi: int) -> None:
    texts = passages(lo, hi, seed=0)
    assert len(texts) >= 20
    assert all(lo <= len(t) <= hi for t in texts)
    assert all(t == t.strip() for t in texts)


def test_passages_are_deterministic_and_the_seed_only_reorders() -> None:
    a, b, c = passages(400, 600, 1), passages(400, 600, 1), passages(400, 600, 2)
    assert a == b
    assert a != c
    assert sorted(a) == sorted(c)


def test_passages_are_prose() -> None:
    texts = passages(960, 1440, 0)
    assert not any(">>>" in t or "::=" in t or "\n   " in t for t in texts)
    # mostly whole sentences: a passage usually starts with a capital and ends with punctuation
    whole = sum(1 for t in texts if t[0].isupper() and t[-1] in '.?!)”"')
    assert whole >= 0.6 * len(texts)


def test_passages_carry_their_topic() -> None:
    records = passage_records(960, 1440, 0)
    assert all(r.topic for r in records)
    assert len({r.topic for r in records}) >= 30


def test_bad_lengths_are_rejected() -> None:
    with pytest.raises(ValueError):
        passages(100, 50, 0)
    with pytest.raises(ValueError):
        passages(0, 50, 0)


def test_vocabulary_is_lowercase_words() -> None:
    words = vocabulary()
    assert len(words) > 1000
    assert list(words) == sorted(set(words))
    assert all(w.isalpha() and w.islower() and 4 <= len(w) <= 9 for w in words)
