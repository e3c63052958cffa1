"""Reuse (sparse) prefills run in layer chunks like full prefills run in token chunks: the same
output as one pass, several engine steps, and short requests served in between."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sparsex import LLM, SamplingParams, Segment

METHODS = ["naive", "epic", "cacheblend", "cacheblend-simple", "blend", {"method": "sparsex", "hybrid": False},
           "sparsex"]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Any) -> str:
    return str(tiny_model_dir("llama"))


def docs(llm: LLM) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [[int(t) for t in torch.randint(5, llm.spec.vocab_size, (n,), generator=g)] for n in (90, 70, 110)]


def reuse_prompt(llm: LLM) -> list[Any]:
    """Warm the three documents in one order, return a prompt holding them in another."""
    a, b, c = docs(llm)
    llm.generate([[Segment(a), "x", Segment(b), "y", Segment(c), "z"]], SamplingParams(max_tokens=1), reuse="none")
    return ["Question first.", Segment(c), " then ", Segment(a), " and ", Segment(b), " end"]


def steps_to_first_token(llm: LLM, prompt: list[Any], reuse: Any) -> tuple[int, Any]:
    req = llm.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0), reuse=reuse, keep_first_logits=True)
    steps = 0
    while not req.output_token_ids:
        llm.step()
        steps += 1
    return steps, llm.output_of(req)


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_a_chunked_reuse_prefill_matches_one_pass(model: str, method: Any) -> None:
    whole = LLM(model=model, kv_cache_memory=16 << 20, max_prefill_tokens=None)
    chunked = LLM(model=model, kv_cache_memory=16 << 20, max_prefill_tokens=8)
    reuse = method if isinstance(method, dict) else {"method": method}
    reuse = {**reuse, "register": False}
    steps_whole, a = steps_to_first_token(whole, reuse_prompt(whole), reuse)
    steps_chunked, b = steps_to_first_token(chunked, reuse_prompt(chunked), reuse)
    assert a.metrics.num_segment_hit_tokens == b.metrics.num_segment_hit_tokens == 270
    assert steps_whole == 1 and steps_chunked > 2  # ran over several engine steps
    assert np.array_equal(a.recomputed_positions, b.recomputed_positions)
    assert np.abs(a.first_logprobs - b.first_logprobs).max() <= 1e-6
    assert a.metrics.compute_fraction == pytest.approx(b.metrics.compute_fraction)


def test_a_short_request_is_served_during_a_chunked_reuse_prefill(model: str) -> None:
    llm = LLM(model=model, kv_cache_memory=32 << 20, max_prefill_tokens=8)
    prompt = reuse_prompt(llm)
    long = llm.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True), reuse={"method": "blend"})
    llm.step()  # admitted; the plan's first layers run
    assert not long.output_token_ids
    short = llm.add_request("Hi", SamplingParams(max_tokens=1, ignore_eos=True), reuse="none")
    order: list[str] = []
    while llm.has_unfinished():
        order += [r.request_id for r in llm.step() if r.finished]
    assert order.index(short.request_id) < order.index(long.request_id)
    assert long.metrics.num_segment_hit_tokens == 270


def test_a_few_hit_tokens_after_a_prefix_are_recomputed_instead(model: str) -> None:
    """Hits covering under MIN_REUSED_SHARE of the tokens after the exact prefix are handed back:
    the rest of the prompt is recomputed exactly (the same as with prefix caching alone)."""
    from sparsex.core.prefill import MIN_REUSED_SHARE

    llm = LLM(model=model, kv_cache_memory=16 << 20, max_prefill_tokens=None)
    g = torch.Generator().manual_seed(3)
    head, small, new = ([int(t) for t in torch.randint(5, llm.spec.vocab_size, (n,), generator=g)]
                        for n in (64, 20, 400))
    assert 20 < MIN_REUSED_SHARE * (20 + 400 + 1)
    llm.generate([[Segment(head), Segment(small), "z"]], SamplingParams(max_tokens=1), reuse="none")
    prompt = [Segment(head), new[:100], Segment(small), new[100:]]

    def first(method: str) -> Any:
        req = llm.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0),
                              reuse={"method": method, "register": False}, keep_first_logits=True)
        return llm.run_to_completion([req])[0]

    blend, prefix = first("blend"), first("prefix")
    assert blend.metrics.num_prefix_hit_tokens == prefix.metrics.num_prefix_hit_tokens == 64
    assert blend.metrics.num_segment_hit_tokens == 0 and blend.metrics.num_reused_runs == 0
    assert np.abs(blend.first_logprobs - prefix.first_logprobs).max() <= 1e-6
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks  # the handed-back hits hold nothing
