"""Store names of the engine's entries: window hashes, block-index records, namespace regions."""

from __future__ import annotations

from sparsex.kv.admission import namespace_regions
from sparsex.kv.tier_keys import (
    block_hash,
    entry_hash,
    index_record,
    parse_index_record,
    window_hashes,
)
from sparsex.segments import SegmentSpan


def test_window_hashes_are_the_block_hashes_of_every_window() -> None:
    ids = list(range(100, 140))
    windows = window_hashes(ids, 16, "t/")
    assert len(windows) == 40 - 16 + 1
    assert windows[7] == block_hash(ids[7:23], "t/") and len(windows[7]) == 32
    assert window_hashes(ids[:10], 16, "t/") == []
    # separate domains
    assert entry_hash(ids[:16], "t/") != block_hash(ids[:16], "t/") and len(entry_hash(ids, "t/")) == 64


def test_content_hashes_are_keyed_by_the_namespace() -> None:
    """The same document under two tenants' namespaces gets unrelated names, and no name equals the
    unkeyed hash anyone could compute from the text alone."""
    import hashlib

    doc = list(range(7, 71))
    names = {ns: (entry_hash(doc, ns), block_hash(doc[:16], ns), window_hashes(doc, 16, ns))
             for ns in ("alice/", "bob/", "alice/kb", "")}
    entries = {e for e, _, _ in names.values()}
    blocks = {b for _, b, _ in names.values()}
    assert len(entries) == len(blocks) == 4
    windows = [w for _, _, ws in names.values() for w in ws]
    assert len(set(windows)) == len(windows)
    plain = hashlib.blake2b(b"".join(t.to_bytes(8, "little") for t in doc), digest_size=32,
                            person=b"sparsex-entry").hexdigest()
    assert plain not in entries
    assert entry_hash(doc, "alice/") == entry_hash(list(doc), "alice/")  # stable: replicas, restarts


def test_index_records_round_trip_and_junk_is_ignored() -> None:
    content = entry_hash([1, 2, 3], "")
    assert parse_index_record(index_record(content, 5)) == content
    for junk in (b"", b"\xff\x00", b"[]", b'{"v": 2}', b'{"v": 1, "entry": "%s"}' % content.encode(),
                 b'{"v": 2, "entry": "%s"}' % content.upper().encode(), b'{"v": 2, "entry": "../x"}'):
        assert parse_index_record(junk) is None


def test_namespace_regions_give_foreign_spans_their_own_namespace() -> None:
    spans = [SegmentSpan(10, 20, "explicit", "other"), SegmentSpan(30, 40, "explicit", "mine"),
             SegmentSpan(45, 60, "explicit", "")]
    assert namespace_regions(0, 50, spans, "mine") == [(0, 10, "mine"), (10, 20, "other"), (20, 50, "mine")]
    assert namespace_regions(0, 15, spans, "mine") == [(0, 10, "mine"), (10, 15, "other")]
    assert namespace_regions(0, 8, [], "") == [(0, 8, "")]
    assert namespace_regions(12, 50, spans, "mine") == [(12, 20, "other"), (20, 50, "mine")]
    assert namespace_regions(25, 50, spans, "mine") == [(25, 50, "mine")]
