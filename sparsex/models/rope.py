"""Rotary position embeddings: tables, application, and re-alignment of cached keys.

Keys are stored *rotated* at the position where they were computed. Moving a
cached key from position ``p`` to ``p'`` is one more rotation by ``p' - p``
(RoPE scores depend only on relative offsets). To make an aligned key equal the
key computed fresh at ``p'`` to float32 precision, the delta rotation is built
from the very cos/sin tables the forward pass uses (fp32 angles, as transformers
computes them), combined in float64: ``R(p') R(p)^T``.

Pair layout. Checkpoints rotate dimension ``i`` of a head together with ``i + D/2`` (the
"rotate_half" convention). The engine permutes the rows of the Q and K projections at load time
(:func:`to_pair_layout`) so that the rotated pairs sit next to each other: dims ``2i, 2i+1``.
Attention scores are unchanged (Q and K are permuted alike, V not at all), and a rotation becomes
one complex multiply over contiguous memory: re-aligning cached keys then costs about as much as
copying them (measured 4 ms vs 32 ms with the half-split formula for 4k tokens x 30 layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# rope_type values whose frequencies do not depend on the sequence length.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class RopeTable:
    """cos/sin tables of one RoPE variant, grown on demand.

    inv_freq: [D/2] float32 inverse frequencies (after any rope scaling).
    attention_scaling: multiplier applied to cos and sin (yarn's mscale; 1.0 otherwise).
    """

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0
    _cos: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    _sin: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin at ``positions`` ([N] int64) -> two [N, D] float32 tensors."""
        need = int(positions.max().item()) + 1 if positions.numel() else 0
        if need > self._cos.shape[0]:
            self._grow(max(need, 2 * self._cos.shape[0], 1024))
        return self._cos[positions], self._sin[positions]

    def rotary(self, positions: torch.Tensor) -> torch.Tensor:
        """The rotation at ``positions`` as [N, D/2] complex64 (pair layout; the same fp32 values)."""
        cos, sin = self.cos_sin(positions)
        h = self.inv_freq.shape[0]
        return torch.complex(cos[:, :h], sin[:, :h])

    def _grow(self, n: int) -> None:
        # Same arithmetic as transformers: fp32 positions times fp32 inv_freq.
        freqs = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, D]
        self._cos = emb.cos() * self.attention_scaling
        self._sin = emb.sin() * self.attention_scaling


def to_pair_layout(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder the rows of a Q/K projection (weight [H*D, ...] or bias [H*D]) or a per-head norm
    weight ([D]) from the half-split layout to the pair layout: new row ``2i`` of each head is
    old row ``i``, new row ``2i+1`` is old row ``i + D/2``."""
    h = head_dim // 2
    perm = torch.stack((torch.arange(h), torch.arange(h) + h), dim=1).flatten()  # [0, h, 1, h+1, ...]
    heads = w.shape[0] // head_dim
    return w.reshape(heads, head_dim, *w.shape[1:])[:, perm].reshape(w.shape).contiguous()


def as_pairs(x: torch.Tensor) -> torch.Tensor:
    """View [..., D] real as [..., D/2] complex (x must be float32/float64)."""
    return torch.view_as_complex(x.view(*x.shape[:-1], -1, 2))


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate x: [N, H, D] (pair layout) by ``rot``: [N, D/2] complex from :meth:`RopeTable.rotary`."""
    xf = x.float()
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):
        xf = xf.contiguous()
    out = torch.view_as_real(as_pairs(xf) * rot[:, None, :]).flatten(-2)
    return out.to(x.dtype)


def delta_rotation(from_pos: torch.Tensor, to_pos: torch.Tensor, table: RopeTable) -> torch.Tensor:
    """The rotation ``R(to) R(from)^T`` per position: [N, 1, D/2] complex128.

    Built from the forward pass's own fp32 tables, combined in float64, so an aligned key
    equals the fresh key to float32 precision. Shared by every layer using ``table``.
    """
    h = table.inv_freq.shape[0]
    c0, s0 = (t[:, :h].double() for t in table.cos_sin(from_pos))  # [N, D/2]
    c1, s1 = (t[:, :h].double() for t in table.cos_sin(to_pos))
    cd, sd = c1 * c0 + s1 * s0, s1 * c0 - c1 * s0
    if table.attention_scaling != 1.0:  # the tables carry the scale twice; a rotation has none
        cd, sd = cd / table.attention_scaling**2, sd / table.attention_scaling**2
    return torch.complex(cd, sd)[:, None, :]


def rotate(k: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Apply a rotation from :func:`delta_rotation` to keys k: [..., N, H, D] (pair layout)."""
    out = torch.empty_like(k)
    rotate_into(out, k, rot)
    return out


def rotate_into(out: torch.Tensor, k: torch.Tensor, rot: torch.Tensor) -> None:
    """``out = rotate(k, rot)`` written in place (``out`` may be a strided view, never ``k``).

    One complex multiply: one read of ``k``, one write of ``out`` (float32 or wider; lower
    precision storage is rotated in float32 and stored back).
    """
    dt = torch.promote_types(k.dtype, torch.float32)
    cdt = torch.complex64 if dt == torch.float32 else torch.complex128
    if out.dtype != dt:
        tmp = k.to(dt, copy=True)
        as_pairs(tmp).mul_(rot.to(cdt))
        out.copy_(tmp)
        return
    torch.mul(as_pairs(k.to(dt)), rot.to(cdt), out=as_pairs(out))


def align_rope(
    k: torch.Tensor, from_pos: torch.Tensor, to_pos: torch.Tensor, table: RopeTable
) -> torch.Tensor:
    """Move keys rotated at ``from_pos`` to ``to_pos`` (k: [N, H, D]; positions: [N] int64).

    Computed in float64. Rotating by Δ then by -Δ is the identity (to float precision).
    """
    if k.numel() == 0 or torch.equal(from_pos, to_pos):
        return k.clone()
    return rotate(k.double(), delta_rotation(from_pos, to_pos, table)).to(k.dtype)


def build_rope_table(hf_config: object, layer_type: str | None = None) -> RopeTable:
    """RoPE table from a transformers config, refusing variants we cannot align exactly."""
    with torch.device("cpu"):  # tables are real tensors even while a model is built on "meta"
        return _build_rope_table(hf_config, layer_type)


def _build_rope_table(hf_config: Any, layer_type: str | None) -> RopeTable:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    rope_type = params.get("rope_type", params.get("type", "default")) if params else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
            "length-dependent RoPE (dynamic, longrope) cannot be re-aligned exactly"
        )
    if rope_type == "default":
        theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        dim = int(head_dim * float(params.get("partial_rotary_factor", 1.0)))
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return RopeTable(inv_freq=inv_freq.float(), attention_scaling=1.0)
    # Scaled variants: transformers' own formulas (imported only for these models).
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from sparsex.models.hf_config import transformers_config

    full = transformers_config(hf_config) if hasattr(hf_config, "_folder") else hf_config
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](full, torch.device("cpu"), **kwargs)
    return RopeTable(inv_freq=inv_freq.float(), attention_scaling=float(scaling))
