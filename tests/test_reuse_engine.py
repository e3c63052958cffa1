"""Segment-level KV reuse inside the engine: exact prefixes, segment hits, failure modes, isolation.

Every test drives ``LLM`` on a tiny random model (see tests/tiny_models.py) and asserts exact hit
counts where the block arithmetic determines them (block size 16). The tiny tokenizer adds no BOS.
"""

from __future__ import annotations

from pydoc_data.topics import topics
from typing import Any

import numpy as np
import pytest

from sparsex import LLM, SamplingParams, Segment
from sparsex.cache import chunk_tokens
from sparsex.reuse.options import METHODS
from tests.tiny_models import make_llm

BS = 16
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
TEXT = "".join(topics[k] for k in ("assert", "assignment", "class", "calls", "comparisons"))


@pytest.fixture(scope="module")
def llama(tiny_model_dir: Any) -> Any:
    return tiny_model_dir("llama")


_ENCODED: dict[str, list[int]] = {}


def toks(llm: LLM, n: int, skip: int = 0) -> list[int]:
    """``n`` token ids of real text, starting ``skip`` tokens in (distinct ``skip`` give distinct docs)."""
    key = str(llm.engine.model_path)
    if key not in _ENCODED:
        _ENCODED[key] = llm.tokenizer.encode(TEXT)
    ids = _ENCODED[key]
    assert len(ids) >= skip + n
    return ids[skip : skip + n]


def no_reg(method: str, **kw: Any) -> dict[str, Any]:
    return {"method": method, "register": False, **kw}


def kl(p_log: np.ndarray, q_log: np.ndarray) -> float:
    """KL(p || q) of two log-probability vectors."""
    p = np.exp(p_log.astype(np.float64))
    return float(np.sum(p * (p_log.astype(np.float64) - q_log.astype(np.float64))))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def assert_no_leak(llm: LLM) -> None:
    assert not llm.has_unfinished()
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks - llm.engine.pool.num_pinned_blocks


# ----- step 7: the exact prefix ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prefix_reuse_is_exact(arch: str, tiny_model_dir: Any) -> None:
    llm = make_llm(tiny_model_dir(arch))
    system = toks(llm, 53)  # 3 full blocks + 5 tokens, more than the tiny Gemma's 24-token window
    q1, q2 = llm.tokenizer.encode("Question: what is it?"), llm.tokenizer.encode("Why, though")
    llm.generate([system + q1], SamplingParams(max_tokens=1), reuse="none")  # publishes the prefix

    p2 = system + q2
    expected = min(common_prefix(system + q1, p2) // BS, (len(p2) - 1) // BS) * BS
    assert expected == 48
    out = llm.generate([p2], GREEDY, reuse=no_reg("prefix"))[0]
    ref = llm.generate([p2], GREEDY, reuse=no_reg("none"))[0]
    assert out.metrics.num_prefix_hit_tokens == expected
    assert out.metrics.num_segment_hit_tokens == 0
    assert out.metrics.num_recomputed_tokens == len(p2) - expected
    assert ref.metrics.num_prefix_hit_tokens == 0
    assert out.token_ids == ref.token_ids
    lp = llm.next_token_logprobs(p2, reuse=no_reg("prefix"))
    lp_ref = llm.next_token_logprobs(p2, reuse=no_reg("none"))
    assert float(np.abs(lp - lp_ref).max()) <= 1e-5
    assert_no_leak(llm)


# ----- failure modes ------------------------------------------------------------------------------


def test_reordered_documents_all_hit(llama: Any) -> None:
    llm = make_llm(llama)
    docs = [toks(llm, n, skip) for n, skip in ((40, 0), (33, 100), (48, 200))]
    question = llm.tokenizer.encode("Which one?")
    llm.generate([[Segment(d) for d in docs] + [question]], SamplingParams(max_tokens=1), reuse="none")
    reordered = [Segment(docs[2]), Segment(docs[0]), Segment(docs[1]), question]
    out = llm.generate([reordered], GREEDY, reuse=no_reg("naive"))[0]
    assert out.metrics.num_prefix_hit_tokens == 0
    assert out.metrics.num_segment_hit_tokens == sum(map(len, docs)) == 121
    assert out.metrics.segment_hit_tokens_by_source == {"explicit": 121}
    assert out.metrics.num_recomputed_tokens == len(question)
    assert len(out.token_ids) == 16
    assert_no_leak(llm)


def test_segments_computed_after_reused_kv_are_published_unless_asked_not_to(llama: Any) -> None:
    """Only KV computed fresh is registered. A new segment after a reused one ran every layer (over
    partly reused KV): published by default, kept out with ``register_after_reuse=False``."""
    llm = make_llm(llama)
    cached, before, after = toks(llm, 40, 0), toks(llm, 33, 100), toks(llm, 48, 200)
    llm.generate([[Segment(cached), "end"]], SamplingParams(max_tokens=1), reuse="none")
    prompt = [Segment(before), Segment(cached), Segment(after), "question"]
    out = llm.generate([prompt], SamplingParams(max_tokens=1),
                       reuse={"method": "naive", "register_after_reuse": False})[0]
    assert out.metrics.num_segment_hit_tokens == 40

    def hit_tokens(doc: list[int]) -> int:
        hit = llm.engine.cache.segments.match(doc, "")
        llm.engine.pool.release(hit.block_ids)
        return hit.num_tokens

    assert hit_tokens(before) == 33  # computed before any reused token: exact, published
    assert hit_tokens(after) == 0  # computed over the reused document: not published when asked not to
    llm.generate([prompt], SamplingParams(max_tokens=1), reuse="naive")
    assert hit_tokens(after) == 48
    assert_no_leak(llm)


def test_same_document_twice_in_one_prompt(llama: Any) -> None:
    llm = make_llm(llama)
    doc = toks(llm, 37)
    mid = llm.tokenizer.encode(" and again: ")
    # Never seen before: the first occurrence is computed, the second cannot hit it (looked up first).
    cold = llm.generate([[Segment(doc), mid, Segment(doc), "?"]], GREEDY, reuse="naive")[0]
    assert cold.metrics.num_segment_hit_tokens == 0
    warm_prompt = [llm.tokenizer.encode("Twice:"), Segment(doc), mid, Segment(doc), "?"]
    warm = llm.generate([warm_prompt], GREEDY, reuse=no_reg("naive"))[0]
    assert warm.metrics.num_segment_hit_tokens == 2 * len(doc)
    assert len(warm.token_ids) == 16
    assert np.isfinite(llm.next_token_logprobs(warm_prompt, reuse=no_reg("naive"))).all()
    for method in ("epic", "cacheblend", "sparsex", "blend"):
        out = llm.generate([warm_prompt], GREEDY, reuse=no_reg(method))[0]
        assert out.metrics.num_segment_hit_tokens == 2 * len(doc), method
        assert np.isfinite(out.logprobs).all() and len(out.token_ids) == 16, method
    assert_no_leak(llm)


@pytest.mark.parametrize("length", [96, 97, 90])
@pytest.mark.parametrize("keep_ends", [True, False])
def test_whole_prompt_cached(length: int, keep_ends: bool, llama: Any) -> None:
    """The same prompt again: the prefix covers every full block but the last token's; the rest is
    the kept end of the prompt (nothing runs), or, with no end kept, runs again."""
    llm = make_llm(llama)
    if not keep_ends:
        llm.engine.prefiller.ends.capacity = 0
    doc = toks(llm, length - 12, 50)
    prompt = [llm.tokenizer.encode("Context:")[:5], Segment(doc), toks(llm, length - 5 - len(doc), 400)]
    first = llm.generate([prompt], GREEDY, reuse="blend")[0]
    assert first.metrics.num_prompt_tokens == length
    again = llm.generate([prompt], GREEDY, reuse="blend")[0]
    ref = llm.generate([prompt], GREEDY, reuse=no_reg("none"))[0]
    expected = (length - 1) // BS * BS
    assert again.metrics.num_prefix_hit_tokens == expected
    assert again.metrics.num_segment_hit_tokens == 0  # the document starts inside the exact prefix
    assert again.metrics.num_recomputed_tokens == (0 if keep_ends else length - expected)
    assert length - expected >= 1
    assert again.token_ids == ref.token_ids
    assert float(np.abs(np.array(again.logprobs) - np.array(ref.logprobs)).max()) <= 1e-5
    assert_no_leak(llm)


def test_prefix_and_segment_hits_in_one_request(llama: Any) -> None:
    llm = make_llm(llama)
    system, d1, d2 = toks(llm, 37, 0), toks(llm, 40, 100), toks(llm, 24, 200)
    llm.generate([[system, Segment(d1), Segment(d2), "First question?"]], SamplingParams(max_tokens=1), reuse="none")
    out = llm.generate([[system, Segment(d2), Segment(d1), "Second?"]], GREEDY, reuse=no_reg("naive"))[0]
    assert out.metrics.num_prefix_hit_tokens == 32  # the system text's full blocks only
    assert out.metrics.num_segment_hit_tokens == len(d1) + len(d2)
    assert out.metrics.num_recomputed_tokens == out.metrics.num_prompt_tokens - 32 - 64
    assert_no_leak(llm)


def test_segment_cached_in_part(llama: Any) -> None:
    """A cached document reused as the head of a longer segment is found whole (its partial last
    block too: runs are matched token by token, not block by block)."""
    llm = make_llm(llama)
    doc, extra = toks(llm, 45, 0), toks(llm, 30, 300)
    llm.generate([["Read:", Segment(doc), "?"]], SamplingParams(max_tokens=1), reuse="none")
    out = llm.generate([["Now read this:", Segment(doc + extra), "?"]], GREEDY, reuse=no_reg("naive"))[0]
    assert out.metrics.num_segment_hit_tokens == 45
    assert out.metrics.num_prefix_hit_tokens == 0
    # ... and the longer segment, computed around the hit, is not published (it holds reused KV).
    assert llm.engine.cache.segments.missing_blocks(doc + extra, "") == [2, 3, 4]
    assert_no_leak(llm)


def test_admitted_request_runs_when_its_hits_hold_the_free_blocks(llama: Any) -> None:
    """A request needing the whole pool, whose segment hits sit on free cached blocks, still runs.

    The hits take the blocks off the free list, so the request gives them back and recomputes.
    """
    llm = make_llm(llama, num_blocks=12)
    doc = list(range(100, 140))
    llm.generate([[Segment(doc), [5, 6, 7]]], SamplingParams(max_tokens=2), reuse="none")
    assert llm.engine.cache.segments.missing_blocks(doc, "") == []
    prompt = [list(range(200, 200 + 12 * BS - 40 - 3 - 4)), Segment(doc), [5, 6, 7]]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    out = llm.generate([prompt], params, reuse=no_reg("naive"))[0]
    assert out.finish_reason == "length" and out.metrics.num_segment_hit_tokens == 0
    ref = make_llm(llama).generate([prompt], params, reuse="none")[0]
    assert out.token_ids == ref.token_ids
    assert_no_leak(llm)


EIGHT = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def warm_docs(llm: LLM) -> list[list[int]]:
    shared = [toks(llm, 40, 100 * i) for i in range(3)]
    llm.generate([[Segment(d), "warm"] for d in shared], SamplingParams(max_tokens=1), reuse="none")
    return shared


def naive_prompts(llm: LLM, shared: list[list[int]]) -> list[list[Any]]:
    return [[f"Q{i}:", Segment(shared[i]), Segment(shared[(i + 1) % 3]), "?"] for i in range(2)]


def run_with_eviction(llm: LLM) -> tuple[list[Any], list[Any]]:
    """Two ``naive`` and two exact ``prefix`` requests run while eight more, each with a new
    document, churn a 30-block pool. Returns (the prefix requests, the naive requests), finished."""
    shared = warm_docs(llm)
    naive = [llm.add_request(p, EIGHT, reuse="naive") for p in naive_prompts(llm, shared)]
    llm.step()
    llm.step()  # both prefilled: their segment hits come from the warm cache
    system = toks(llm, 40, 2000)
    churn = [[f"N{i}", Segment(toks(llm, 60, 1200 + 70 * i)), "?"] for i in range(8)]
    exact = [llm.add_request(system + toks(llm, 30, 700), EIGHT, reuse="prefix")]
    while not exact[0].output_token_ids:  # prefilled (its system text published) among the churn
        if churn:
            llm.add_request(churn.pop(0), EIGHT, reuse="naive")
        llm.step()
    exact.append(llm.add_request(system + toks(llm, 30, 750), EIGHT, reuse="prefix"))
    while llm.has_unfinished() or churn:
        if churn:
            llm.add_request(churn.pop(0), EIGHT, reuse="naive")
        llm.step()
    return exact, naive


def test_eviction_while_requests_run(llama: Any) -> None:
    llm = make_llm(llama, num_blocks=30)
    exact, naive = run_with_eviction(llm)
    assert all(r.finish_reason == "length" for r in exact + naive)
    assert exact[1].metrics.num_prefix_hit_tokens == 32  # the system text, published by exact[0]
    assert [r.metrics.num_segment_hit_tokens for r in naive] == [80, 80]
    # The churn evicted the warm documents (LRU) while the requests reading them kept running.
    assert all(llm.engine.cache.segments.missing_blocks(d, "") != [] for d in warm_docs(make_llm(llama)))
    assert_no_leak(llm)

    # Each request's output is what it gets without any churn.
    alone = make_llm(llama)
    for r in exact:
        assert r.output_token_ids == alone.generate([r.prompt_token_ids], EIGHT, reuse="none")[0].token_ids
    quiet = make_llm(llama, num_blocks=30)
    ref = quiet.generate(naive_prompts(quiet, warm_docs(quiet)), EIGHT, reuse="naive")
    assert [r.metrics.num_segment_hit_tokens for r in ref] == [80, 80]
    assert [r.output_token_ids for r in naive] == [r.token_ids for r in ref]


def test_steady_stream_of_new_documents(llama: Any) -> None:
    llm = make_llm(llama, num_blocks=16)
    warm = toks(llm, 30, 5000)
    (sid,) = llm.cache_segments([warm])
    num_pinned = llm.engine.pool.num_pinned_blocks
    assert num_pinned == 2
    params = SamplingParams(max_tokens=1, temperature=0.0)
    for i in range(200):
        prompt = [f"Q{i}", Segment(warm), Segment(toks(llm, 20, 20 * i)), "?"]
        out = llm.generate([prompt], params, reuse="naive")[0]
        assert out.metrics.num_segment_hit_tokens == len(warm), i
        assert llm.engine.pool.num_pinned_blocks == num_pinned
        assert llm.engine.pool.num_cached_blocks <= llm.engine.pool.num_blocks
        assert_no_leak(llm)
    (listed,) = llm.list_segments()
    assert listed["id"] == sid and listed["num_hits"] == 200


# ----- isolation ----------------------------------------------------------------------------------


def test_namespaces_never_share_entries(llama: Any) -> None:
    llm = make_llm(llama)
    doc = toks(llm, 40)
    prompt = ["A preamble that is long enough to fill one block.", Segment(doc), "?"]
    first = llm.generate([prompt], GREEDY, reuse={"method": "naive", "namespace": "a"})[0]
    assert first.metrics.num_prefix_hit_tokens == first.metrics.num_segment_hit_tokens == 0
    for method in ("naive", "blend", "prefix"):
        other = llm.generate([prompt], GREEDY, reuse=no_reg(method, namespace="b"))[0]
        assert other.metrics.num_prefix_hit_tokens == 0, method
        assert other.metrics.num_segment_hit_tokens == 0, method
    same = llm.generate([prompt], GREEDY, reuse=no_reg("naive", namespace="a"))[0]
    assert same.metrics.num_prefix_hit_tokens == (len(same.prompt_token_ids) - 1) // BS * BS
    moved = llm.generate([["Other words.", Segment(doc), "?"]], GREEDY, reuse=no_reg("naive", namespace="a"))[0]
    assert moved.metrics.num_segment_hit_tokens == len(doc)
    assert moved.metrics.num_prefix_hit_tokens == 0
    assert_no_leak(llm)


def test_segment_namespace_isolates_its_text(llama: Any) -> None:
    """A segment's own namespace salts its entries, and no prefix hit reaches into its text."""
    llm = make_llm(llama)
    doc = toks(llm, 40)
    head = toks(llm, 20, 900)
    llm.generate([[head, Segment(doc, namespace="a"), "?"]], GREEDY, reuse="naive")
    out = llm.generate([[head, Segment(doc, namespace="b"), "?"]], GREEDY, reuse=no_reg("naive"))[0]
    assert out.metrics.num_segment_hit_tokens == 0
    assert out.metrics.num_prefix_hit_tokens == 16  # only the shared plain text before the segment
    same = llm.generate([[head, Segment(doc, namespace="a"), "?"]], GREEDY, reuse=no_reg("naive"))[0]
    assert same.metrics.num_prefix_hit_tokens == 16 and same.metrics.num_segment_hit_tokens == len(doc)
    moved = llm.generate([["Moved:", Segment(doc, namespace="a"), "?"]], GREEDY, reuse=no_reg("naive"))[0]
    assert moved.metrics.num_segment_hit_tokens == len(doc)


# ----- where segments come from -------------------------------------------------------------------


def test_plain_text_gets_automatic_segments(llama: Any) -> None:
    llm = make_llm(llama)
    body = topics["class"][:800]
    first_prompt, prompt = f"Read the passage below.\n{body}", f"A different instruction, then:\n{body}"
    ids = llm.tokenizer.encode(prompt)
    assert len(ids) >= 400
    chunks, first_chunks = chunk_tokens(ids), chunk_tokens(llm.tokenizer.encode(first_prompt))
    # Content-defined: the chunks after the first are the same passages in both prompts.
    assert len(chunks) >= 3 and [b - a for a, b in chunks[1:]] == [b - a for a, b in first_chunks[1:]]
    first = llm.generate([first_prompt], SamplingParams(max_tokens=1), reuse="blend")[0]
    assert first.metrics.segment_sources == {"auto": len(first_chunks)}
    out = llm.generate([prompt], GREEDY, reuse=no_reg("blend"))[0]
    assert out.metrics.num_prefix_hit_tokens == 0
    assert out.metrics.segment_sources == {"auto": len(chunks)}
    # The whole passage hits, at any offset and whatever it was chunked at: only the changed
    # instruction (and at most a block at its seam) and the last token are recomputed.
    head = len(llm.tokenizer.encode("A different instruction, then:\n"))
    found = out.metrics.segment_hit_tokens_by_source["auto"]
    assert found == out.metrics.num_segment_hit_tokens >= len(ids) - 1 - head - 16
    off = llm.generate([prompt], GREEDY, reuse=no_reg("blend", auto_segments=False))[0]
    assert off.metrics.num_segment_hit_tokens == 0 and off.metrics.segment_sources == {}


def test_chat_messages_are_segments(llama: Any) -> None:
    llm = make_llm(llama)
    history = [
        {"role": "user", "content": topics["assert"][:300]},
        {"role": "assistant", "content": topics["assignment"][:300]},
    ]
    first = llm.chat([{"role": "system", "content": "Be brief."}, *history], GREEDY, reuse="blend")
    assert first.metrics.segment_sources == {"chat": 3}
    assert first.metrics.num_segment_hit_tokens == 0
    later = [{"role": "system", "content": "Today is another day: be kind."}, *history,
             {"role": "user", "content": "And so?"}]
    out = llm.chat(later, GREEDY, reuse=no_reg("blend"))
    assert out.metrics.segment_sources == {"chat": 4}
    assert out.metrics.num_prefix_hit_tokens == 0
    contents = [llm.tokenizer.encode(m["content"]) for m in history]
    assert out.metrics.segment_hit_tokens_by_source == {"chat": sum(map(len, contents))}


# ----- every method on a reordered RAG prompt -----------------------------------------------------


def test_every_method_on_reordered_rag_prompt(llama: Any) -> None:
    llm = make_llm(llama)
    system = toks(llm, 40, 3000)
    docs = [toks(llm, 48, 100 * i) for i in range(4)]
    llm.generate([[system, *map(Segment, docs), "First question?"]], SamplingParams(max_tokens=1), reuse="none")
    prompt = [system, *(Segment(docs[i]) for i in (3, 1, 0, 2)), "Second question?"]
    ref = llm.next_token_logprobs(prompt, reuse=no_reg("none"))
    divergence: dict[str, float] = {}
    for method in METHODS:
        lp = llm.next_token_logprobs(prompt, reuse=no_reg(method))
        assert lp.shape == ref.shape and np.isfinite(lp).all(), method
        assert abs(float(np.exp(lp.astype(np.float64)).sum()) - 1.0) < 1e-4, method
        divergence[method] = kl(ref, lp)
        out = llm.generate([prompt], SamplingParams(max_tokens=1), reuse=no_reg(method))[0]
        assert out.metrics.reuse == method
        assert out.metrics.num_prefix_hit_tokens == (32 if method != "none" else 0), method
        hits = 0 if method in ("none", "prefix") else 4 * 48
        assert out.metrics.num_segment_hit_tokens == hits, method
    assert divergence["none"] == 0.0
    assert divergence["prefix"] <= 1e-6  # exact prefix, nothing else reused (0 up to float rounding: the
    # keys of shared prefix blocks are attended in place and merged by log-sum-exp, ~3e-8 here)
    assert divergence["naive"] > 1e-6  # stale cross-document KV changes the distribution
    assert_no_leak(llm)
