"""What every model family shares: its spec, the per-step context, norms, and the layer loop contract.

A model exposes ``embed(ids)``, ``layer_forward(i, x, step)`` and ``compute_logits(x)`` so the
runner can drive an explicit per-layer loop (and change which tokens are active between layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from sparsex.models.rope import RopeTable, to_pair_layout


@dataclass
class ModelSpec:
    """Shapes and per-layer attention settings of a loaded model.

    model_type: transformers' model_type (llama, qwen2, qwen3, mistral, gemma3_text).
    num_layers / num_heads / num_kv_heads / head_dim / hidden_size / vocab_size: shapes.
    max_position: the model's context limit (max_position_embeddings).
    windows: per layer, the sliding-window size or None for full attention.
    rope: per layer, the RoPE table (Gemma 3 has one per layer type).
    attn_scale: softmax scale of attention scores.
    """

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position: int
    windows: list[int | None]
    rope: list[RopeTable]
    attn_scale: float
    family: str = field(default="llama")


class CausalLM(Protocol):
    spec: ModelSpec

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor: ...

    def qkv(self, i: int, x: torch.Tensor, step: StepContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def layer_forward(self, i: int, x: torch.Tensor, step: StepContext) -> torch.Tensor: ...

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor: ...


KVRead = slice | tuple[slice, ...] | torch.Tensor
"""How a sequence's KV is read from the flat slot storage, in position order: one slice (its blocks
are consecutive: a zero-copy view), a few slices (runs of consecutive blocks, e.g. shared prefix
blocks then its own: attention reads each in place), or a gather index of slots."""


@dataclass
class SeqSlice:
    """One sequence's active tokens inside a flat forward step.

    start/end: rows [start, end) of the flat hidden-state tensor.
    positions: [n] absolute positions of the active tokens, ascending.
    slots: [n] flat KV slots the active tokens write to.
    read: how to read the sequence's whole KV (positions 0..ctx_len-1), see :data:`KVRead`.
    ctx_len: number of KV positions visible after this step.
    """

    start: int
    end: int
    positions: torch.Tensor
    slots: torch.Tensor
    read: KVRead
    ctx_len: int

    @property
    def dense(self) -> bool:
        """True when the active tokens are exactly positions 0..ctx_len-1."""
        return self.end - self.start == self.ctx_len


class KVStorage(Protocol):
    """The paged KV storage a model layer reads and writes (``sparsex.kv.paged.KVCache`` implements it).

    Declared here, where the models need it, so that models never import the storage module.
    """

    def read(self, layer: int, read: KVRead) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of layer ``layer`` at ``read``: [T, Hkv, D] each (a view for one slice, else a copy)."""
        ...

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K, V ([n, Hkv, D]) of layer ``layer`` into ``slots`` ([n])."""
        ...


@dataclass
class StepContext:
    """Everything a layer needs beyond its hidden states for one forward step.

    seqs: the sequences in the step, in flat order.
    positions: [N] positions of all active tokens (concatenated seqs).
    kv: the paged KV storage.
    capture_layers: layers whose queries and pre-write K/V are recorded in ``captured``.
    captured: layer -> list per seq of (q [n, Hq, D], k_before, v_before [ctx, Hkv, D]), for selection.
    before_write: called as ``before_write(layer, seq, k, v)`` with a sequence's fresh (rotated) K/V
        before they overwrite its cached entries and before attention reads them (a planned prefill
        uses it to correct the cached KV of tokens that do not run).
    """

    seqs: list[SeqSlice]
    positions: torch.Tensor
    kv: KVStorage
    capture_layers: frozenset[int] = frozenset()
    captured: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    before_write: Callable[[int, SeqSlice, torch.Tensor, torch.Tensor], None] | None = None
    rotary_cache: dict[int, torch.Tensor] = field(default_factory=dict)
    """Rotations of ``positions`` per RoPE table (filled by :meth:`rotary`); steps over the same
    positions (a sparse plan's layers) may share one."""

    def rotary(self, table: RopeTable) -> torch.Tensor:
        """[N, D/2] complex rotations of this step's positions for ``table`` (once per step per table)."""
        key = id(table)
        if key not in self.rotary_cache:
            self.rotary_cache[key] = table.rotary(self.positions)
        return self.rotary_cache[key]


def split_qkv(qkv: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused projection's output [N, (Hq + 2 Hkv) D] as q [N, Hq, D], k and v [N, Hkv, D] (views)."""
    n, d = qkv.shape[0], spec.head_dim
    nq, nkv = spec.num_heads * d, spec.num_kv_heads * d
    q = qkv[:, :nq].view(n, spec.num_heads, d)
    k = qkv[:, nq : nq + nkv].view(n, spec.num_kv_heads, d)
    v = qkv[:, nq + nkv :].view(n, spec.num_kv_heads, d)
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """One fused Q/K/V projection weight (or bias) from transformers' three, Q and K rows put in
    RoPE's pair layout (``rope.to_pair_layout``) at load time."""
    return torch.cat([to_pair_layout(q, head_dim), to_pair_layout(k, head_dim), v], dim=0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm in float32; Gemma scales by (1 + w) (offset=1), Llama by w. For float32 inputs the
    fused kernel (same arithmetic, ~3x faster on CPU)."""
    if x.dtype == torch.float32:
        w = weight.float() + offset if offset else weight.float()
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (xf * (offset + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)
