"""Reuse on plain prompts: documents pasted into one string are found at any offset, whatever the
chunking, and every method still reproduces full prefill when it recomputes everything."""

from __future__ import annotations

from pydoc_data.topics import topics
from typing import Any

import numpy as np
import pytest

from sparsex import LLM, SamplingParams
from sparsex.reuse.options import METHODS
from tests.tiny_models import make_llm

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
DOCS = [topics[k][:380] for k in ("assert", "class", "calls", "comparisons")]


@pytest.fixture(scope="module")
def llama(tiny_model_dir: Any) -> Any:
    return tiny_model_dir("llama")


def plain(docs: list[str], question: str = "Question: which document defines the term?") -> str:
    return "Use these documents.\n\n" + "\n\n".join(docs) + "\n\n" + question


def no_reg(method: str, **kw: Any) -> dict[str, Any]:
    return {"method": method, "register": False, **kw}


def doc_tokens(llm: LLM, doc: str) -> int:
    return len(llm.tokenizer.encode(doc))


@pytest.fixture
def seen(llama: Any) -> LLM:
    """An engine that served the four documents once, inside one long plain prompt."""
    llm = make_llm(llama)
    llm.generate(plain(DOCS), SamplingParams(max_tokens=1), reuse="none")
    return llm


def test_a_document_seen_inside_a_long_prompt_hits_alone(seen: LLM) -> None:
    out = seen.generate(f"Summarize:\n{DOCS[2]}\nDone?", GREEDY, reuse=no_reg("naive"))[0]
    assert out.metrics.num_segment_hit_tokens >= doc_tokens(seen, DOCS[2]) - 2 * 16  # at most a block per seam
    assert out.metrics.num_reused_runs >= 1


def test_trimmed_duplicated_and_reordered_documents_hit(seen: LLM) -> None:
    trimmed = DOCS[1][60:330]
    out = seen.generate(f"Part of it:\n{trimmed}\nOK?", GREEDY, reuse=no_reg("naive"))[0]
    assert out.metrics.num_segment_hit_tokens >= doc_tokens(seen, trimmed) - 2 * 16
    twice = seen.generate(f"{DOCS[0]}\n---\n{DOCS[0]}\nSame?", GREEDY, reuse=no_reg("naive"))[0]
    assert twice.metrics.num_segment_hit_tokens >= 2 * (doc_tokens(seen, DOCS[0]) - 2 * 16)
    order = [DOCS[3], DOCS[1], DOCS[0], DOCS[2]]
    prompt = plain(order, "Question: another one?")
    n = len(seen.tokenizer.encode(prompt))
    out = seen.generate(prompt, GREEDY, reuse=no_reg("naive"))[0]
    docs = sum(doc_tokens(seen, d) for d in DOCS)
    assert out.metrics.num_segment_hit_tokens >= 0.95 * docs  # found at any offset, whatever the chunking
    assert out.metrics.num_prompt_tokens == n and out.metrics.num_reused_runs >= 4
    assert out.metrics.num_seam_lost_tokens <= 16 * 2 * len(DOCS)


def test_a_hit_never_changes_the_cached_entry(seen: LLM) -> None:
    prompt = plain([DOCS[2], DOCS[0]], "Question: again?")
    first = seen.next_token_logprobs(prompt, reuse=no_reg("blend", shift=1.0))
    for _ in range(2):  # the shift and the recomputation wrote into the request's copy only
        assert np.array_equal(seen.next_token_logprobs(prompt, reuse=no_reg("blend", shift=1.0)), first)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("none", "naive")])  # naive never recomputes
def test_every_method_recomputing_everything_reproduces_none(seen: LLM, method: str) -> None:
    prompt = plain([DOCS[1], DOCS[3], DOCS[0]], "Question: and now?")
    ref = seen.next_token_logprobs(prompt, reuse=no_reg("none"))
    opts = {"budget": 1.0, "epic_tokens": 100_000}
    got = seen.next_token_logprobs(prompt, reuse=no_reg(method, **opts))
    assert np.abs(got - ref).max() <= 1e-4


def test_runs_from_another_namespace_are_never_found(seen: LLM) -> None:
    out = seen.generate(plain(DOCS), GREEDY, reuse=no_reg("naive", namespace="tenant-b"))[0]
    assert out.metrics.num_segment_hit_tokens == 0 and out.metrics.num_prefix_hit_tokens == 0
