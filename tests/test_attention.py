"""attend() against a plain softmax reference, for every query pattern the engine produces."""

from __future__ import annotations

import pytest
import torch

from sparsex.models.attention import QUERY_BLOCK, attend, attend_pieces, attention_probs, split_read


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
    # a recompute set: scattered positions, always with the last one, more than one block
    picked = torch.randperm(t - 1, generator=gen)[: QUERY_BLOCK + 37]
    return torch.cat([picked.sort().values, torch.tensor([t - 1])])


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("pattern", ["dense", "decode", "after_prefix", "scattered"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_attend_matches_reference(pattern: str, window: int | None, heads: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    t, d = QUERY_BLOCK + 200, 16  # room for a recompute set of more than one block
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


def test_split_read_cuts_runs_at_a_position() -> None:
    runs = (slice(28, 40), slice(8, 14))  # positions 0..11 in slots 28..39, 12..17 in slots 8..13
    assert split_read(runs, 5) == ([slice(28, 33)], (slice(33, 40), slice(8, 14)))
    assert split_read(runs, 12) == ([slice(28, 40)], slice(8, 14))
    assert split_read(runs, 14) == ([slice(28, 40), slice(8, 10)], slice(10, 14))


@pytest.mark.parametrize("pattern", ["decode", "after_prefix", "scattered_late"])
def test_attend_pieces_matches_reference(pattern: str) -> None:
    gen = torch.Generator().manual_seed(3)
    t, d, hq, hkv = 200, 16, 6, 2
    q_pos = {"decode": torch.tensor([t - 1]), "after_prefix": torch.arange(130, t),
             "scattered_late": torch.tensor([120, 121, 150, 170, 199])}[pattern]
    q = torch.randn(q_pos.numel(), hq, d, generator=gen)
    k, v = torch.randn(t, hkv, d, generator=gen), torch.randn(t, hkv, d, generator=gen)
    s = int(q_pos[0])
    cuts = [0, 17, 64, s]  # the head in three pieces, as runs of blocks would hold it
    head = [(k[a:b], v[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    out = attend_pieces(q, head, k[s:], v[s:], q_pos, scale=d**-0.5)
    want = reference(q, k, v, q_pos, d**-0.5, None)
    assert float((out.double() - want).abs().max()) <= 1e-5


def test_reader_gives_runs_of_consecutive_blocks() -> None:
    from sparsex.kv.paged import MAX_READ_RUNS, KVCache
    from sparsex.models.base import ModelSpec

    spec = ModelSpec("llama", 1, 2, 1, 4, 8, 10, 64, [None], [], 0.5)
    kv = KVCache(spec, num_blocks=16, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    cpu = torch.device("cpu")
    assert kv.reader([3, 4, 5], 10, cpu) == slice(12, 22)
    assert kv.reader([7, 8, 9, 2, 3], 18, cpu) == (slice(28, 40), slice(8, 14))
    scattered = list(range(0, 2 * (MAX_READ_RUNS + 1), 2))
    index = kv.reader(scattered, 4 * len(scattered), cpu)
    assert isinstance(index, torch.Tensor) and index[:5].tolist() == [0, 1, 2, 3, 8]
    kv.k.zero_()
    kv.k[0, 28:40] = 1.0
    kv.k[0, 8:14] = 2.0
    k, _ = kv.read(0, kv.reader([7, 8, 9, 2, 3], 18, cpu))
    assert k[:12].eq(1.0).all() and k[12:].eq(2.0).all() and k.shape == (18, 1, 4)
