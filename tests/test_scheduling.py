"""Fairness in the engine: chunked prefill interleaves other requests, choices share one prefill,
pinning runs as chunked requests. Asserted as orderings and exact outputs, never as timings."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sparsex import LLM, SamplingParams
from sparsex.core.request import RequestStatus
from sparsex.core.scheduler import Scheduler


@pytest.fixture(scope="module")
def model(tiny_model_dir: Any) -> str:
    return str(tiny_model_dir("llama"))


def long_ids(llm: LLM, n: int) -> list[int]:
    return [int(t) for t in torch.randint(5, llm.spec.vocab_size, (n,), generator=torch.Generator().manual_seed(n))]


def test_chunked_prefill_matches_one_pass(model: str) -> None:
    whole = LLM(model=model, kv_cache_memory=16 << 20, max_prefill_tokens=None)
    chunked = LLM(model=model, kv_cache_memory=16 << 20, max_prefill_tokens=48)
    ids = long_ids(whole, 300)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    a = whole.generate(ids, params, reuse="none")[0]
    b = chunked.generate(ids, params, reuse="none")[0]
    assert a.token_ids == b.token_ids
    la = whole.next_token_logprobs(ids, reuse="none")
    lb = chunked.next_token_logprobs(ids, reuse="none")
    assert np.abs(la - lb).max() <= 1e-4


@pytest.mark.parametrize("bad", [0, -4, 1.5, True])
def test_max_prefill_tokens_must_be_positive(model: str, bad: Any) -> None:
    """A chunk of 0 tokens would never finish a prefill: refused when the engine is built."""
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        LLM(model=model, kv_cache_memory=1 << 20, max_prefill_tokens=bad)


def test_a_short_request_finishes_while_a_long_prefill_is_chunked(model: str) -> None:
    llm = LLM(model=model, kv_cache_memory=32 << 20, max_prefill_tokens=32)
    long = llm.add_tokenized(long_ids(llm, 600), SamplingParams(max_tokens=2, ignore_eos=True), reuse="none")
    llm.step()  # the long prompt is admitted and its first chunk runs
    short = llm.add_request("Hi", SamplingParams(max_tokens=3, ignore_eos=True))
    order: list[str] = []
    while llm.has_unfinished():
        for r in llm.step():
            if r.finished:
                order.append(r.request_id)
    assert order.index(short.request_id) < order.index(long.request_id)
    assert long.finish_reason == short.finish_reason == "length"


def test_pinning_is_chunked_and_interleaves_with_decoding(model: str) -> None:
    llm = LLM(model=model, kv_cache_memory=32 << 20, max_prefill_tokens=32)
    talker = llm.add_request("Tell me", SamplingParams(max_tokens=8, ignore_eos=True))
    llm.step()  # talker prefilled: decoding from now on
    pin = llm.add_pin(long_ids(llm, 400), namespace="kb", name="doc")
    tokens_during_pin = 0
    while not pin.finished:
        llm.step()
        tokens_during_pin = len(talker.output_token_ids) if not pin.finished else tokens_during_pin
    assert pin.pinned_segment_id is not None and pin.finish_reason == "stop"
    assert tokens_during_pin >= 5  # the talker decoded between the pin's chunks
    assert [s["id"] for s in llm.list_segments("kb")] == [pin.pinned_segment_id]


def test_choices_share_one_prefill_and_match_separate_runs(model: str) -> None:
    llm = LLM(model=model, kv_cache_memory=32 << 20)
    ids = long_ids(llm, 100)
    params = [SamplingParams(max_tokens=5, temperature=0.8, seed=7 + j, ignore_eos=True) for j in range(3)]
    prefills: list[int] = []
    real = llm.engine.prefiller.start
    llm.engine.prefiller.start = lambda *a: (prefills.append(1), real(*a))[1]  # type: ignore[method-assign]
    reqs = llm.add_choices(ids, params, reuse="none")
    shared = llm.run_to_completion(reqs)
    assert len(prefills) == 1
    llm.engine.prefiller.start = real  # type: ignore[method-assign]
    for p, out in zip(params, shared, strict=True):
        alone = llm.generate(ids, p, reuse="none")[0]
        assert out.token_ids == alone.token_ids
        assert out.metrics.num_prompt_tokens == 100
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks


def test_aborting_the_first_choice_before_its_prefill_aborts_the_others(model: str) -> None:
    llm = LLM(model=model, kv_cache_memory=32 << 20)
    reqs = llm.add_choices(long_ids(llm, 50), [SamplingParams(max_tokens=3)] * 3)
    llm.abort(reqs[0])
    assert all(r.finished and r.finish_reason == "abort" for r in reqs)
    assert not llm.has_unfinished() and llm.step() == []


def test_scheduler_alternates_prefill_chunks_with_decoding_and_prefers_the_shortest() -> None:
    from sparsex.core.request import Request
    from tests.fake_admitter import FakeAdmitter

    sched = Scheduler(FakeAdmitter(free=100))  # type: ignore[arg-type]
    long = Request("long", list(range(40)), SamplingParams(max_tokens=1))
    sched.add(long)
    assert sched.schedule().prefill is long
    long.num_computed_tokens = 10  # the engine ran one chunk of 10 tokens
    short = Request("short", [1, 2], SamplingParams(max_tokens=1))
    sched.add(short)
    out = sched.schedule()
    assert [r.request_id for r, _ in out.admitted] == ["short"] and out.prefill is short
    sched.prefilled(short)
    short.output_token_ids.append(5)
    assert sched.schedule().decode == [short]  # a prefill ran last: decode now
    assert sched.schedule().prefill is long  # then the long prefill again
    assert sched.schedule().decode == [short]


def test_a_long_prompt_finishes_within_its_bound_under_another_tenants_flood(model: str) -> None:
    """Tenant b sends two fresh short prompts every step for as long as the test runs; tenant a's one
    long prompt still gets its first token within 2 * T * c steps of its admission (T = 2 tenants,
    c = its chunks; it is its tenant's only request: ``sparsex/core/scheduler.py``). Shortest-first alone
    ran only b's prompts while they kept coming."""
    llm = LLM(model=model, kv_cache_memory=32 << 20, max_prefill_tokens=32)
    rng = torch.Generator().manual_seed(0)
    flood = SamplingParams(max_tokens=2, ignore_eos=True)

    def short() -> list[int]:  # fresh text: nothing cached
        return [int(t) for t in torch.randint(5, llm.spec.vocab_size, (20,), generator=rng)]

    for _ in range(4):
        llm.add_tokenized(short(), flood, reuse="none", tenant="b")
    long = llm.add_tokenized(long_ids(llm, 600), SamplingParams(max_tokens=1), reuse="none", tenant="a")
    admitted_at = None
    b_finished_meanwhile = 0
    for i in range(1_000):
        for _ in range(2):
            llm.add_tokenized(short(), flood, reuse="none", tenant="b")
        b_finished_meanwhile += sum(r.finished and r.tenant == "b" for r in llm.step())
        if admitted_at is None and long.status is not RequestStatus.WAITING:
            admitted_at = i
        if long.finished:
            break
    assert long.finished and long.finish_reason == "length" and admitted_at is not None
    assert i - admitted_at + 1 <= 2 * 2 * -(-600 // 32)
    assert b_finished_meanwhile >= 10  # the flood was served too, and was still coming
    assert llm.engine.scheduler.num_unfinished > 0
