"""Segment shift as tensor functions: per-segment means, and the hook's effect on hand-made KV."""

from __future__ import annotations

import pytest
import torch

from sparsex.kv.paged import KVCache
from sparsex.models.base import ModelSpec, SeqSlice
from sparsex.models.rope import RopeTable
from sparsex.reuse.shift import segment_means, segment_shift


def test_segment_means_average_each_segment_and_leave_empty_ones_at_zero() -> None:
    delta = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [20.0, 0.0], [30.0, 3.0]])
    means, counts = segment_means(delta, torch.tensor([0, 0, 2, 2, 2]), 3)
    assert counts.tolist() == [2, 0, 3]
    assert torch.allclose(means, torch.tensor([[2.0, 3.0], [0.0, 0.0], [20.0, 1.0]]))
    cmeans, _ = segment_means(torch.complex(delta, -delta), torch.tensor([0, 0, 2, 2, 2]), 3)
    assert torch.allclose(cmeans.real, means) and torch.allclose(cmeans.imag, -means)


def _spec(num_layers: int = 2, heads: int = 2, dim: int = 8) -> ModelSpec:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    table = RopeTable(inv_freq)
    return ModelSpec(
        model_type="llama", num_layers=num_layers, num_heads=heads, num_kv_heads=heads, head_dim=dim,
        hidden_size=heads * dim, vocab_size=10, max_position=64, windows=[None] * num_layers,
        rope=[table] * num_layers, attn_scale=dim**-0.5,
    )


@pytest.mark.parametrize(("weight_v", "shrink", "excluded"),
                         [(None, 0.0, ()), (0.0, 0.0, ()), (0.2, 2.0, ()), (None, 2.0, (5, 15))])
def test_shift_adds_the_rotated_mean_correction_to_idle_tokens_only(
    weight_v: float | None, shrink: float, excluded: tuple[int, ...],
) -> None:
    """Sources' fresh keys differ from the cached ones by one unrotated vector per segment, rotated to
    each source's position; idle tokens of the segment must move by weight x that vector rotated to
    *their* positions (values by ``weight_v``, both scaled by m / (m + shrink) for a segment with m
    sources). A segment with no running token, and non-reused tokens, stay as they were; so does a
    segment whose only running tokens are ``excluded`` from the sources (``not_sources``)."""
    torch.manual_seed(0)
    spec = _spec()
    kv = KVCache(spec, num_blocks=4, block_size=8, dtype=torch.float32, device=torch.device("cpu"))
    kv.k.normal_()
    kv.v.normal_()
    table = [3, 0, 2, 1]  # the request's blocks, not in order
    n, layer, weight = 30, 1, 0.5
    reused = torch.zeros(n, dtype=torch.bool)
    reused[2:12] = True
    reused[14:20] = True
    reused[20:28] = True
    runs = [(2, 12), (14, 20), (20, 28)]
    k0, v0 = kv.k.clone(), kv.v.clone()
    hook = segment_shift(kv, spec, table, reused, runs, weight, weight_v, shrink,
                         torch.tensor(excluded, dtype=torch.int64) if excluded else None)

    running = torch.tensor([0, 1, 3, 5, 15, 28, 29])  # sources in runs 0 and 1; none in run 2
    slots = kv.slots(table, running)
    u = torch.randn(len(runs), spec.num_kv_heads, spec.head_dim // 2, dtype=torch.complex64)
    w = torch.randn(len(runs), spec.num_kv_heads, spec.head_dim)
    rot = spec.rope[0].rotary(torch.arange(n))[:, None, :]
    seg = torch.tensor([-1, -1, 0, 0, 1, -1, -1])
    k_new, v_new = kv.k[layer][slots].clone(), kv.v[layer][slots].clone()
    src = seg >= 0
    k_new[src] += torch.view_as_real(u[seg[src]] * rot[running[src]]).flatten(-2)
    v_new[src] += w[seg[src]]
    hook(layer, SeqSlice(0, 7, running, slots, slice(0, n), n), k_new, v_new)

    idle = reused.clone()
    idle[running] = False
    sources = [sum(1 for q in qs if q not in excluded) for qs in ((3, 5), (15,))]  # per run with a runner
    for p in range(n):
        s = kv.slots(table, torch.tensor([p]))
        k_p, v_p, k_was, v_was = kv.k[layer][s][0], kv.v[layer][s][0], k0[layer][s][0], v0[layer][s][0]
        j = next((i for i, (a, b) in enumerate(runs) if a <= p < b), -1)
        if idle[p] and j in (0, 1) and sources[j]:
            trust = sources[j] / (sources[j] + shrink)  # sources: 3 and 5 in run 0, 15 in run 1
            expect = k_was + trust * weight * torch.view_as_real(u[j] * rot[p]).flatten(-2)
            assert torch.allclose(k_p, expect, atol=1e-5), p
            wv = weight if weight_v is None else weight_v
            assert torch.allclose(v_p, v_was + trust * wv * w[j], atol=1e-6), p
        else:  # running tokens (written later by the layer), runs with no source, non-reused tokens
            assert torch.equal(k_p, k_was) and torch.equal(v_p, v_was), p
    assert torch.equal(kv.k[0], k0[0]) and torch.equal(kv.v[0], v0[0])  # other layers untouched


def test_shift_weight_defaults_per_family_and_validates() -> None:
    from sparsex.reuse.options import BlendOptions, shift_weight

    assert shift_weight(BlendOptions(), "llama") == 0.5
    assert shift_weight(BlendOptions(), "gemma3") == 0.3
    assert shift_weight(BlendOptions(shift=0.0), "llama") == 0.0  # off
    assert shift_weight(BlendOptions(shift=0.8), "gemma3") == 0.8
    with pytest.raises(ValueError, match="shift"):
        BlendOptions(shift=1.5)
    with pytest.raises(ValueError, match="shift_v"):
        BlendOptions(shift_v=-0.1)
    with pytest.raises(ValueError, match="shift_shrink"):
        BlendOptions(shift_shrink=-1)
    with pytest.raises(ValueError, match="shift_sources"):
        BlendOptions(shift_sources="overflow")


def test_narrow_layer_defaults_per_family_and_validates() -> None:
    from sparsex.reuse.options import BlendOptions, narrow_layer

    assert narrow_layer(BlendOptions(), "llama") == 2  # chosen on the tune split (issue #16)
    assert narrow_layer(BlendOptions(), "gemma3") == 2  # chosen on the tune split too
    assert narrow_layer(BlendOptions(narrow_layer=0), "llama") == 0  # one stage
    assert narrow_layer(BlendOptions(narrow_layer=5), "gemma3") == 5
    with pytest.raises(ValueError, match="narrow_layer"):
        BlendOptions(narrow_layer=-1)


def test_budget_defaults_per_family_and_validates() -> None:
    from sparsex.reuse.options import BlendOptions, budget_fraction

    assert budget_fraction(BlendOptions(), "llama") == 0.1  # chosen on the tune split (issue #16)
    assert budget_fraction(BlendOptions(), "gemma3") == 0.1  # chosen on the tune split too
    assert budget_fraction(BlendOptions(budget=0.3), "gemma3") == 0.3
    assert budget_fraction(BlendOptions(budget=0.0), "llama") == 0.0
    with pytest.raises(ValueError, match="budget"):
        BlendOptions(budget=1.5)
