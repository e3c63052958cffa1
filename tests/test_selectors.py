"""Selectors pick what they must on small hand-made tensors."""

from __future__ import annotations

import torch

from sparsex.attention import attention_probs
from sparsex.reuse.selectors import (
    epic_positions,
    kv_deviation_scores,
    overflow_positions,
    runs,
    segment_start_prior,
    sparse_q_scores,
    tail_positions,
    top_k_reused,
    top_segments,
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


def test_epic_first_tokens_of_each_segment_and_union() -> None:
    assert epic_positions([(2, 5), (10, 20)], 2).tolist() == [2, 3, 10, 11]
    assert epic_positions([(2, 3)], 4).tolist() == [2]
    assert union(torch.tensor([5, 1]), torch.tensor([1, 3]), torch.tensor([])).tolist() == [1, 3, 5]


def test_segment_start_prior_decays_from_each_segment_start() -> None:
    prior = segment_start_prior([(2, 5), (6, 8)], 9, scale=1.0)
    assert prior[[0, 1, 5, 8]].tolist() == [0.0, 0.0, 0.0, 0.0]  # outside every segment
    assert prior[2] == prior[6] == 1.0
    assert prior[2] > prior[3] > prior[4] > 0
    assert torch.isclose(prior[3], torch.exp(torch.tensor(-1.0)))


def test_top_segments_takes_whole_segments_by_mean_score() -> None:
    scores = torch.tensor([0.0, 5, 1, 1, 1, 0, 9, 0, 0, 0, 2, 2, 2, 2])
    runs = [(1, 5), (5, 10), (10, 14)]  # means 2.0, 1.8, 2.0
    # k = 8: the first segment (mean 2.0, earlier of the tie), then the third; exactly 8 positions.
    assert top_segments(scores, runs, 8).tolist() == [1, 2, 3, 4, 10, 11, 12, 13]
    # k = 6: the crossing segment gives its best positions only (ties toward the earlier position).
    assert top_segments(scores, runs, 6).tolist() == [1, 2, 3, 4, 10, 11]
    assert top_segments(scores, runs, 0).numel() == 0
    assert top_segments(scores, [], 5).numel() == 0
