"""An exact repeat of an exactly computed prompt samples its first token with no forward pass, and
then decodes exactly as a recompute would; nothing is recalled across tenants, prompts, methods."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sparsex import LLM, SamplingParams, Segment
from sparsex.kv.prompt_ends import PromptEnds
from tests.tiny_models import make_llm

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Any) -> Any:
    return tiny_model_dir("llama")


def ids(llm: LLM, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(5, llm.spec.vocab_size, (n,), generator=g)]


def first(llm: LLM, prompt: Any, reuse: Any = None, params: SamplingParams = GREEDY) -> Any:
    req = llm.add_request(prompt, params, reuse=reuse, keep_first_logits=True)
    return llm.run_to_completion([req])[0]


@pytest.mark.parametrize("n", [150, 160, 9])  # a partial tail, a full last block, no full block
def test_an_exact_repeat_runs_nothing_and_decodes_like_a_recompute(model: Any, n: int) -> None:
    llm = make_llm(model)
    prompt = ids(llm, n, 1)
    once = first(llm, prompt)
    assert once.metrics.compute_fraction == 1.0
    again = first(llm, prompt)
    assert again.metrics.compute_fraction == 0.0 and len(again.recomputed_positions) == 0
    assert again.metrics.num_prefix_hit_tokens == (n - 1) // 16 * 16
    recompute = first(make_llm(model), prompt, reuse="prefix")  # a fresh engine computes it all
    assert again.token_ids == once.token_ids == recompute.token_ids
    assert np.abs(again.first_logprobs - recompute.first_logprobs).max() <= 1e-5
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks  # the repeat gave its blocks back


def test_nothing_is_recalled_for_another_prompt_tenant_or_method(model: Any) -> None:
    llm = make_llm(model)
    prompt = ids(llm, 150, 2)
    first(llm, prompt)
    other_end = [*prompt[:-1], (prompt[-1] + 1) % llm.spec.vocab_size]
    assert first(llm, other_end).metrics.compute_fraction > 0  # same prefix blocks, another tail
    assert first(llm, prompt, reuse={"namespace": "tenant-b"}).metrics.compute_fraction == 1.0
    assert first(llm, prompt, reuse="none").metrics.compute_fraction == 1.0  # the reference never recalls
    assert first(llm, prompt).metrics.compute_fraction == 0.0


def test_a_prompt_that_reused_segments_leaves_no_end(model: Any) -> None:
    llm = make_llm(model)
    doc, question = ids(llm, 64, 3), ids(llm, 30, 4)
    first(llm, [Segment(doc), question[:5]], reuse="none")
    reused = [question, Segment(doc), question[:9]]
    assert first(llm, reused, reuse="naive").metrics.num_segment_hit_tokens > 0  # approximate KV
    assert first(llm, reused, reuse="naive").metrics.compute_fraction > 0  # so never kept as an end


def test_ends_are_bounded_and_an_evicted_prefix_drops_its_end(model: Any) -> None:
    llm = make_llm(model, num_blocks=40)
    prompts = [ids(llm, 60, 10 + i) for i in range(3)]
    ends = llm.engine.prefiller.ends
    ends.capacity = 2
    for p in prompts:
        first(llm, p, params=SamplingParams(max_tokens=1))
    assert len(ends) == 2
    assert first(llm, prompts[0], params=SamplingParams(max_tokens=1)).metrics.compute_fraction > 0  # pushed out
    first(llm, ids(llm, 600, 99), params=SamplingParams(max_tokens=1))  # evicts every cached block
    after = first(llm, prompts[2], params=SamplingParams(max_tokens=1)).metrics
    assert after.num_prefix_hit_tokens == 0 and after.compute_fraction == 1.0  # its end is not used
    assert isinstance(ends, PromptEnds)
