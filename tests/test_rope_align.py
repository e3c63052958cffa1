"""RoPE re-alignment of cached segment keys: the rotation algebra and the engine's copy path.

Layer-0 keys depend only on a token and its position, so a segment's layer-0 keys computed at
positions ``p`` and moved to ``p'`` by the engine must equal the keys a full prefill computes at
``p'``. Deeper layers also depend on context; there the engine must still apply exactly the
rotation of that layer's own RoPE table to the cached keys and copy values unchanged.
"""

from __future__ import annotations

from pydoc_data.topics import topics

import pytest
import torch

from sparsex import LLM, SamplingParams, Segment
from sparsex.core.request import Request
from sparsex.models.loader import load_model
from sparsex.models.rope import (
    RopeTable,
    align_rope,
    apply_rope,
    build_rope_table,
    delta_rotation,
    rotate,
    to_pair_layout,
)
from tests.tiny_models import ARCHS


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def unique_tables(tables: list[RopeTable]) -> list[RopeTable]:
    return list({id(t): t for t in tables}.values())


def scaled_table(rope_type: str) -> RopeTable:
    import transformers as tf

    scaling = {
        "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 128, "rope_theta": 500000.0},
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                 "rope_theta": 10000.0},
    }[rope_type]
    cfg = tf.LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=4096,
                         rope_scaling=scaling)
    return build_rope_table(cfg)


def round_trip_errors(table: RopeTable, head_dim: int) -> tuple[float, float]:
    """Max rel. error of rotating keys by Δ then -Δ: with align_rope, and with the store's fp32 path."""
    gen = torch.Generator().manual_seed(0)
    n = 64
    p = torch.randint(0, 3000, (n,), generator=gen)
    q = torch.randint(0, 3000, (n,), generator=gen)
    k = apply_rope(torch.randn(n, 2, head_dim, generator=gen), table.rotary(p))  # keys rotated at p
    there_and_back = align_rope(align_rope(k, p, q, table), q, p, table)
    fp32 = rotate(rotate(k, delta_rotation(p, q, table)), delta_rotation(q, p, table))
    return rel_err(there_and_back, k), rel_err(fp32, k)


@pytest.mark.parametrize("arch", ARCHS)
def test_rotate_there_and_back_is_identity(arch: str, tiny_model_dir) -> None:
    model, _ = load_model(tiny_model_dir(arch), torch.device("cpu"))
    tables = unique_tables(model.spec.rope)
    assert len(tables) == (2 if arch == "gemma3" else 1)  # Gemma 3: sliding and full-attention tables
    for table in tables:
        exact, fp32 = round_trip_errors(table, model.spec.head_dim)
        assert exact <= 1e-6, (arch, exact)
        assert fp32 <= 1e-6, (arch, fp32)


@pytest.mark.parametrize("rope_type", ["llama3", "yarn"])
def test_rotate_there_and_back_scaled_rope(rope_type: str) -> None:
    table = scaled_table(rope_type)
    if rope_type == "yarn":
        assert table.attention_scaling != 1.0  # the mscale must be divided out of the delta
    exact, fp32 = round_trip_errors(table, 64)
    assert exact <= 1e-6 and fp32 <= 1e-6, (exact, fp32)


@pytest.mark.parametrize("rope_type", ["default", "yarn"])
def test_pair_layout_rotates_like_the_checkpoints_half_split_rope(rope_type: str) -> None:
    """Permuting dims into pairs, then rotating, equals the checkpoint's rotate_half RoPE, permuted."""
    table = scaled_table("yarn") if rope_type == "yarn" else RopeTable(1.0 / 10000 ** (torch.arange(0, 64, 2) / 64))
    gen = torch.Generator().manual_seed(2)
    x, p = torch.randn(40, 3, 64, generator=gen), torch.randint(0, 4000, (40,), generator=gen)
    cos, sin = (t[:, None, :] for t in table.cos_sin(p))
    half_split = x * cos + torch.cat((-x[..., 32:], x[..., :32]), dim=-1) * sin  # transformers' formula
    pairs = apply_rope(to_pair_layout(x.reshape(-1), 64).view_as(x), table.rotary(p))
    assert rel_err(pairs, to_pair_layout(half_split.reshape(-1), 64).view_as(x)) <= 1e-6
    # Rows of a projection: permuting the weight permutes its output the same way.
    w = torch.randn(3 * 64, 16, generator=gen)
    h = torch.randn(5, 16, generator=gen)
    assert torch.equal(h @ to_pair_layout(w, 64).T, to_pair_layout((h @ w.T).T, 64).T)


def test_align_equals_rotation_at_target_position() -> None:
    """R(p') R(p)^T applied to R(p) k is R(p') k, for a yarn table with attention scaling."""
    table = scaled_table("yarn")
    gen = torch.Generator().manual_seed(1)
    raw = torch.randn(50, 2, 64, generator=gen)
    p, q = torch.arange(50), torch.arange(50) + 777
    k_p = apply_rope(raw, table.rotary(p))
    k_q = apply_rope(raw, table.rotary(q))
    assert rel_err(align_rope(k_p, p, q, table), k_q) <= 1e-5
    assert rel_err(rotate(k_p, delta_rotation(p, q, table)), k_q) <= 1e-5


# ----- through the engine ------------------------------------------------------------------------


def doc_tokens(llm: LLM, n: int, topic: str = "assert") -> list[int]:
    toks = llm.tokenizer.encode(topics[topic] + topics["assignment"])
    assert len(toks) >= n
    return toks[:n]


def k_at(llm: LLM, layer: int, table: list[int], positions: list[int]) -> torch.Tensor:
    slots = llm.engine.kv.slots(table, torch.tensor(positions))
    return llm.engine.kv.k[layer][slots].clone()


def v_at(llm: LLM, layer: int, table: list[int], positions: list[int]) -> torch.Tensor:
    slots = llm.engine.kv.slots(table, torch.tensor(positions))
    return llm.engine.kv.v[layer][slots].clone()


def prefilled(llm: LLM, prompt: list, reuse: dict) -> Request:
    """Add a request and run exactly its prefill step; the request still holds its blocks."""
    req = llm.add_request(prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), reuse=reuse)
    assert llm.step() == [req]
    assert not req.finished and req.block_table
    return req


def check_alignment(
    llm: LLM, len_a: int, len_b: int, doc_len: int, namespace: str, fresh_tol: float = 1e-5, align_tol: float = 1e-6
) -> None:
    """Cache a document after ``len_a`` tokens, reuse it after ``len_b`` and compare its keys."""
    doc = doc_tokens(llm, doc_len)
    filler = llm.tokenizer.encode(topics["class"])
    prefix_a, prefix_b = filler[:len_a], filler[-len_b:]
    assert prefix_a[:16] != prefix_b[:16]  # no prefix-cache hit: the document is a segment hit
    bos = len(llm.tokenizer.with_bos([]))
    llm.generate([[prefix_a, Segment(doc)]], SamplingParams(max_tokens=1, temperature=0.0),
                 reuse={"method": "none", "namespace": namespace})
    prompt_b = [prefix_b, Segment(doc), "Q?"]
    pos_a = list(range(bos + len_a, bos + len_a + doc_len))
    pos_b = list(range(bos + len_b, bos + len_b + doc_len))

    reused = prefilled(llm, prompt_b, {"method": "naive", "register": False, "namespace": namespace})
    assert reused.metrics.num_segment_hit_tokens == doc_len
    assert reused.metrics.num_prefix_hit_tokens == 0
    # The segment's own cached blocks (computed at pos_a), as the index stores them.
    hit = llm.engine.cache.segments.match(doc, namespace)
    try:
        assert hit.num_tokens == doc_len
        assert hit.positions[0] == pos_a[0]
        cached = {layer: (k_at(llm, layer, hit.block_ids, list(range(doc_len))),
                          v_at(llm, layer, hit.block_ids, list(range(doc_len))))
                  for layer in range(llm.spec.num_layers)}
    finally:
        llm.engine.pool.release(hit.block_ids)
    loaded = {layer: (k_at(llm, layer, reused.block_table, pos_b), v_at(llm, layer, reused.block_table, pos_b))
              for layer in range(llm.spec.num_layers)}
    llm.abort(reused)

    fresh = prefilled(llm, prompt_b, {"method": "none", "register": False, "namespace": namespace})
    assert fresh.prompt_token_ids == reused.prompt_token_ids
    k_fresh = k_at(llm, 0, fresh.block_table, pos_b)
    llm.abort(fresh)

    err = rel_err(loaded[0][0], k_fresh)
    assert err <= fresh_tol, (len_a, len_b, err)
    # Sanity: the test can fail: the unaligned cached keys differ from the fresh ones.
    assert rel_err(cached[0][0], k_fresh) > 1e-2
    p_a, p_b = torch.tensor(pos_a), torch.tensor(pos_b)
    for layer in range(llm.spec.num_layers):
        want = align_rope(cached[layer][0], p_a, p_b, llm.spec.rope[layer])
        assert rel_err(loaded[layer][0], want) <= align_tol, (layer, rel_err(loaded[layer][0], want))
        assert torch.equal(loaded[layer][1], cached[layer][1]), layer  # values copied unchanged
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_aligns_cached_segment_keys(arch: str, tiny_model_dir) -> None:
    llm = LLM(model=str(tiny_model_dir(arch)), kv_cache_memory=4 << 20)
    # Moved right across the tiny Gemma's 24-token window, then left, with a partial last block.
    check_alignment(llm, len_a=3, len_b=45, doc_len=37, namespace="right")
    check_alignment(llm, len_a=52, len_b=7, doc_len=40, namespace="left")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_engine_aligns_keys_stored_in_bfloat16_in_several_chunks(arch: str, tiny_model_dir, monkeypatch) -> None:
    """Low-precision KV is rotated through a float32 temporary, chunk by chunk; values copied as is."""
    from sparsex.kv.segment_store import SegmentStore

    monkeypatch.setattr(SegmentStore, "_LOAD_CHUNK", {})  # every dtype falls back to the default...
    monkeypatch.setattr("sparsex.kv.segment_store._DEFAULT_LOAD_CHUNK", 8)  # ...of 8 tokens: 5 chunks
    llm = LLM(model=str(tiny_model_dir(arch)), kv_cache_memory=4 << 20, kv_dtype="bfloat16")
    assert llm.engine.kv.k.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: the aligned key is the float32 rotation rounded once.
    check_alignment(llm, len_a=3, len_b=45, doc_len=37, namespace="right", fresh_tol=2e-2, align_tol=8e-3)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3-270m"])
def test_engine_aligns_cached_segment_keys_real_models(model: str) -> None:
    llm = LLM(model=model, kv_cache_memory=96 << 20)
    check_alignment(llm, len_a=5, len_b=70, doc_len=50, namespace="right")
    check_alignment(llm, len_a=90, len_b=11, doc_len=33, namespace="left")
