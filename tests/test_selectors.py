"""Selectors pick what they must on small hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from sparsex.models.attention import attention_probs
from sparsex.reuse.selectors import (
    deviation_scores,
    epic_positions,
    filter_schedule,
    kv_deviation_scores,
    normalized,
    overflow_positions,
    query_mass,
    runs,
    sink_positions,
    sparse_q_scores,
    tail_positions,
    top_k_reused,
    union,
)


def test_top_k_only_among_reused_and_sorted() -> None:
    scores = torch.tensor([9.0, 1.0, 5.0, 7.0, 3.0, 8.0, 0.0, 2.0])
    reused = torch.tensor([False, True, True, True, True, True, True, False])
    assert top_k_reused(scores, reused, 3).tolist() == [2, 3, 5]  # 9.0 at 0 is not reused
    assert top_k_reused(scores, reused, 0).tolist() == []
    assert top_k_reused(scores, reused, 100).tolist() == [1, 2, 3, 4, 5, 6]


def test_top_k_ties_break_toward_earlier_position() -> None:
    scores = torch.ones(6)
    reused = torch.ones(6, dtype=torch.bool)
    assert top_k_reused(scores, reused, 2).tolist() == [0, 1]


def test_sparse_q_scores_sum_over_heads_and_queries() -> None:
    probs = torch.zeros(2, 2, 4)  # [H, N, T]
    probs[0, 0] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    probs[0, 1] = torch.tensor([0.0, 0.25, 0.75, 0.0])
    probs[1, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    probs[1, 1] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    s = sparse_q_scores(probs, 6)
    assert s.tolist() == [1.5, 0.75, 0.75, 1.0, 0.0, 0.0]


def test_attention_probs_are_causal_and_gqa_maps_h_to_h_div_group() -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 4, 8)  # 2 queries, 4 heads
    k = torch.randn(5, 2, 8)  # 5 keys, 2 KV heads -> group 2
    probs = attention_probs(q, k, torch.tensor([1, 4]), scale=1.0)
    assert torch.all(probs[:, 0, 2:] == 0)  # query at position 1 sees keys 0..1 only
    assert torch.allclose(probs.sum(-1), torch.ones(4, 2))
    # head 3 uses KV head 1 (3 // 2), not KV head 3 % 2 = 1 vs tile order: check head 1 uses KV head 0
    want = torch.softmax(q[1, 1] @ k[:, 0].T, dim=-1)
    assert torch.allclose(probs[1, 1], want, atol=1e-6)


def test_kv_deviation_scores() -> None:
    fresh = torch.zeros(3, 1, 2)
    cached = torch.zeros(3, 1, 2)
    cached[1, 0] = torch.tensor([3.0, 4.0])
    assert kv_deviation_scores(fresh, cached).tolist() == [0.0, 5.0, 0.0]


def test_runs_overflow_and_prefix_boundary() -> None:
    reused = torch.tensor([True] * 4 + [False] * 2 + [True] * 6 + [False])
    assert runs(~reused) == [(4, 6), (12, 13)]
    # width 2: two reused tokens before and after each non-reused run
    assert overflow_positions(reused, 2).tolist() == [2, 3, 6, 7, 10, 11]
    # nothing before `start` is ever recomputed
    assert overflow_positions(reused, 2, start=3).tolist() == [3, 6, 7, 10, 11]
    assert overflow_positions(reused, 0).tolist() == []
    # only the side after each run (tokens before new text never attend to it)
    assert overflow_positions(reused, 2, before=False).tolist() == [6, 7]


def test_tail_fallback_only_when_prompt_ends_in_a_segment() -> None:
    reused = torch.tensor([False] + [True] * 10 + [False])  # last token always computed
    assert tail_positions(reused, [(1, 11)], 4).tolist() == [7, 8, 9, 10]
    reused2 = torch.tensor([False] + [True] * 6 + [False] * 5)  # a question follows the segment
    assert tail_positions(reused2, [(1, 7)], 4).tolist() == []


def test_sinks_are_reused_tokens_cached_at_the_first_positions() -> None:
    reused = torch.tensor([False, True, True, True, True, False, True, True])
    cached_at = torch.tensor([-1, 0, 1, 2, 37, -1, 0, 5])  # two entries cached from a prompt start
    assert sink_positions(reused, cached_at, 2).tolist() == [1, 2, 6]
    assert sink_positions(reused, cached_at, 0).tolist() == []
    assert sink_positions(reused & torch.tensor([True] * 6 + [False] * 2), cached_at, 1).tolist() == [1]


def test_epic_first_tokens_of_each_segment_and_union() -> None:
    assert epic_positions([(2, 5), (10, 20)], 2).tolist() == [2, 3, 10, 11]
    assert epic_positions([(2, 3)], 4).tolist() == [2]
    assert union(torch.tensor([5, 1]), torch.tensor([1, 3]), torch.tensor([])).tolist() == [1, 3, 5]


def test_normalized_signals_add_on_one_scale() -> None:
    among = torch.tensor([False, True, True, True])
    assert normalized(torch.tensor([100.0, 1, 2, 3]), among).tolist() == [50.0, 0.5, 1.0, 1.5]
    fresh = torch.zeros(4, 1, 2)
    k_cached = torch.tensor([[[0.0, 0]], [[3, 4]], [[0, 0]], [[0, 1]]])  # K deviations 0, 5, 0, 1
    v_cached = torch.tensor([[[0.0, 0]], [[0, 0]], [[0, 2]], [[0, 0]]])  # V deviations 0, 0, 2, 0
    got = deviation_scores(fresh, k_cached, fresh, v_cached, among)
    # K over its mean (2) + V over its mean (2/3) among positions 1..3
    assert torch.allclose(got, torch.tensor([0.0, 2.5, 3.0, 0.5]))
    q_mass = torch.tensor([9.0, 0, 0, 3])
    assert torch.allclose(deviation_scores(fresh, k_cached, fresh, v_cached, among, q_mass) - got,
                          torch.tensor([9.0, 0, 0, 3]))


def test_query_mass_scores_only_the_non_reused_queries() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(3, 2, 4), torch.randn(5, 1, 4)  # queries at positions 2..4, GQA 2:1
    positions = torch.tensor([2, 3, 4])
    fresh = torch.tensor([False, False, True, False, True])  # position 3 is reused: its query is not counted
    got = query_mass(q, k, positions, fresh, scale=0.5, window=None)
    probs = attention_probs(q[[0, 2]], k, positions[[0, 2]], scale=0.5)
    assert torch.allclose(got, sparse_q_scores(probs, 5))
    assert got[3] > 0 and float(got.sum()) == pytest.approx(4.0)  # 2 queries x 2 heads, each sums to 1


def test_filter_schedule_shrinks_linearly_to_the_budget() -> None:
    assert filter_schedule(20, 100, 1.5, 2) == [30, 25, 20]
    assert filter_schedule(20, 100, 1.5, 0) == [20]  # no stage: one selection of the budget
    assert filter_schedule(20, 25, 2.0, 1) == [25, 20]  # never more than the reused tokens
    assert filter_schedule(100, 100, 1.5, 3) == [100, 100, 100, 100]  # full budget stays full
    assert filter_schedule(0, 100, 1.5, 2) == [0, 0, 0]
