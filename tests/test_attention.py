"""attend() against a plain softmax reference, for every query pattern the engine produces."""

from __future__ import annotations

import pytest
import torch

from sparsex.models.attention import QUERY_CHUNK, attend, attention_probs


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float,
              window: int | None) -> torch.Tensor:
    """Float64 softmax attention by position, KV heads repeated for GQA. Returns [N, Hq, D]."""
    g = q.shape[1] // k.shape[1]
    kk, vv = (t.double().repeat_interleave(g, dim=1) for t in (k, v))  # [T, Hq, D]
    scores = torch.einsum("nhd,thd->hnt", q.double(), kk) * scale
    k_pos = torch.arange(k.shape[0])
    visible = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        visible &= k_pos[None, :] > q_pos[:, None] - window
    probs = torch.softmax(scores.masked_fill(~visible[None], float("-inf")), dim=-1)
    return torch.einsum("hnt,thd->nhd", probs, vv)


def case(pattern: str, t: int, gen: torch.Generator) -> torch.Tensor:
    if pattern == "dense":
        return torch.arange(t)
    if pattern == "decode":
        return torch.tensor([t - 1])
    if pattern == "after_prefix":  # a prefill whose first 40 positions came from the prefix cache
        return torch.arange(40, t)
    # a recompute set: scattered positions, always with the last one, more than one chunk
    picked = torch.randperm(t - 1, generator=gen)[: QUERY_CHUNK + 37]
    return torch.cat([picked.sort().values, torch.tensor([t - 1])])


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("pattern", ["dense", "decode", "after_prefix", "scattered"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_attend_matches_reference(pattern: str, window: int | None, heads: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    t, d = 300, 16
    hq, hkv = heads
    q_pos = case(pattern, t, gen)
    q = torch.randn(q_pos.numel(), hq, d, generator=gen)
    k, v = torch.randn(t, hkv, d, generator=gen), torch.randn(t, hkv, d, generator=gen)
    out = attend(q, k, v, q_pos, scale=d**-0.5, window=window, dense_causal=pattern == "dense")
    want = reference(q, k, v, q_pos, d**-0.5, window)
    assert out.shape == want.shape
    assert float((out.double() - want).abs().max()) <= 1e-5


def test_attend_reads_low_precision_kv() -> None:
    gen = torch.Generator().manual_seed(1)
    q_pos = torch.tensor([3, 50, 51, 99])
    q = torch.randn(4, 4, 16, generator=gen)
    k, v = torch.randn(100, 2, 16, generator=gen), torch.randn(100, 2, 16, generator=gen)
    out = attend(q, k.bfloat16(), v.bfloat16(), q_pos, scale=0.25)
    want = reference(q, k.bfloat16().float(), v.bfloat16().float(), q_pos, 0.25, None)
    assert out.dtype == torch.float32
    assert float((out.double() - want).abs().max()) <= 1e-5


def test_attention_probs_are_causal_distributions() -> None:
    gen = torch.Generator().manual_seed(2)
    q_pos = torch.tensor([0, 7, 8, 30])
    probs = attention_probs(torch.randn(4, 4, 8, generator=gen), torch.randn(31, 2, 8, generator=gen), q_pos,
                            scale=0.3, window=10)
    assert torch.allclose(probs.sum(-1), torch.ones(4, 4))
    k_pos = torch.arange(31)
    invisible = (k_pos[None, :] > q_pos[:, None]) | (k_pos[None, :] <= q_pos[:, None] - 10)
    assert float(probs[:, invisible].abs().max()) == 0.0
