"""Pure admission helpers: which parts of a prompt's segments are published after a reuse prefill."""

from __future__ import annotations

from sparsex.kv.admission import fresh_pieces
from sparsex.segments import SegmentSpan


def span(a: int, b: int, source: str = "auto") -> SegmentSpan:
    return SegmentSpan(a, b, source, "ns")  # type: ignore[arg-type]


def test_fresh_pieces_cut_reused_runs_out_of_segments() -> None:
    spans = [span(0, 100), span(100, 300, "explicit"), span(300, 340)]
    runs = [(40, 60), (110, 200), (210, 215), (330, 400)]
    assert fresh_pieces(spans, runs, min_len=16) == [
        span(0, 40), span(60, 100),  # around a run inside the chunk
        span(215, 300, "explicit"),  # 100..110 and 200..210 are too short to ever be found
        span(300, 330),
    ]
    assert fresh_pieces(spans, [], min_len=16) == spans  # nothing reused: every segment whole
    assert fresh_pieces(spans, [(0, 400)], min_len=16) == []
    assert fresh_pieces([span(0, 20)], [(3, 4)], min_len=1) == [span(0, 3), span(4, 20)]
