"""Store names of the engine's entries: window hashes, block-index records, namespace regions."""

from __future__ import annotations

from sparsex.reuse.tier_keys import (
    block_hash,
    entry_hash,
    index_record,
    namespace_regions,
    parse_index_record,
    window_hashes,
)
from sparsex.segments import SegmentSpan


def test_window_hashes_are_the_block_hashes_of_every_window() -> None:
    ids = list(range(100, 140))
    windows = window_hashes(ids, 16)
    assert len(windows) == 40 - 16 + 1
    assert windows[7] == block_hash(ids[7:23]) and len(windows[7]) == 32
    assert window_hashes(ids[:10], 16) == []
    assert entry_hash(ids[:16]) != block_hash(ids[:16]) and len(entry_hash(ids)) == 64  # separate domains


def test_index_records_round_trip_and_junk_is_ignored() -> None:
    content = entry_hash([1, 2, 3])
    assert parse_index_record(index_record(content, 5)) == content
    for junk in (b"", b"\xff\x00", b"[]", b'{"v": 1}', b'{"v": 2, "entry": "%s"}' % content.encode(),
                 b'{"v": 1, "entry": "%s"}' % content.upper().encode(), b'{"v": 1, "entry": "../x"}'):
        assert parse_index_record(junk) is None


def test_namespace_regions_give_foreign_spans_their_own_namespace() -> None:
    spans = [SegmentSpan(10, 20, "explicit", "other"), SegmentSpan(30, 40, "explicit", "mine"),
             SegmentSpan(45, 60, "explicit", "")]
    assert namespace_regions(50, spans, "mine") == [(0, 10, "mine"), (10, 20, "other"), (20, 50, "mine")]
    assert namespace_regions(15, spans, "mine") == [(0, 10, "mine"), (10, 15, "other")]
    assert namespace_regions(8, [], "") == [(0, 8, "")]
