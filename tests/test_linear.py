"""oneDNN-packed linear layers: the same products as F.linear, swapped in at load time on CPU, and
a kernel that disagrees leaves the model on F.linear."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsex import LLM
from sparsex.models.linear import PackedLinear, pack_model, packing_available

pytestmark = pytest.mark.skipif(not packing_available(torch.device("cpu")), reason="a PyTorch build without oneDNN")


def test_pack_model_swaps_every_linear_for_the_same_product() -> None:
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8, bias=False)) for _ in range(2)])
    head_w = torch.randn(32, 8)
    x = torch.randn(5, 8)
    with torch.inference_mode():
        want = [layer(x) for layer in layers]
        head = pack_model(layers, head_w)
        got = [layer(x) for layer in layers]
        assert all(isinstance(m, PackedLinear) for layer in layers for m in (layer[0], layer[2]))
        assert not any(isinstance(m, nn.Linear) for m in layers.modules())
        for a, b in zip(got, want, strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        assert torch.allclose(head(x), F.linear(x, head_w), rtol=1e-5, atol=1e-5)


def test_the_engine_runs_packed_and_keeps_f_linear_when_the_kernel_disagrees(
    tiny_model_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = str(tiny_model_dir("llama"))
    packed = LLM(model=folder, kv_cache_memory=8 << 20)
    assert packed.engine.model.head is not None
    assert isinstance(packed.engine.model.layers[0].qkv_proj, PackedLinear)
    monkeypatch.setattr(PackedLinear, "forward", lambda self, x: torch.zeros(x.shape[0], self.out_features))
    plain = LLM(model=folder, kv_cache_memory=8 << 20)
    assert plain.engine.model.head is None and isinstance(plain.engine.model.layers[0].qkv_proj, nn.Linear)
    monkeypatch.undo()
    a = packed.next_token_logprobs("Hello there", reuse="none")
    b = plain.next_token_logprobs("Hello there", reuse="none")
    assert abs(a - b).max() <= 1e-4
