"""Rotary position embeddings: tables, application, and re-alignment of cached keys.

Keys are stored *rotated* at the position where they were computed. Moving a
cached key from position ``p`` to ``p'`` is one more rotation by ``p' - p``
(RoPE scores depend only on relative offsets). To make an aligned key equal the
key computed fresh at ``p'`` to float32 precision, the delta rotation is built
from the very cos/sin tables the forward pass uses (fp32 angles, as transformers
computes them), combined in float64: ``R(p') R(p)^T``.
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

    def _grow(self, n: int) -> None:
        # Same arithmetic as transformers: fp32 positions times fp32 inv_freq.
        freqs = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, D]
        self._cos = emb.cos() * self.attention_scaling
        self._sin = emb.sin() * self.attention_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, H, D]; cos/sin: [N, D] -> rotated x (half-split layout, as in HF checkpoints)."""
    cos = cos[:, None, :].to(x.dtype)  # [N, 1, D]
    sin = sin[:, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def delta_rotation(
    from_pos: torch.Tensor, to_pos: torch.Tensor, table: RopeTable
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotation ``R(to) R(from)^T`` per position: two [N, 1, D] float64 tensors.

    Built from the forward pass's own fp32 tables, combined in float64, so an aligned key
    equals the fresh key to float32 precision. Shared by every layer using ``table``.
    """
    s = table.attention_scaling
    c0, s0 = (t.double() / s for t in table.cos_sin(from_pos))  # [N, D]
    c1, s1 = (t.double() / s for t in table.cos_sin(to_pos))
    return (c1 * c0 + s1 * s0)[:, None, :], (s1 * c0 - c1 * s0)[:, None, :]


def rotate(k: torch.Tensor, cd: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """Apply a delta rotation from :func:`delta_rotation` to keys k: [N, H, D] (computed in fp32+)."""
    dt = torch.promote_types(k.dtype, torch.float32)
    kf = k.to(dt)
    return (kf * cd.to(dt) + rotate_half(kf) * sd.to(dt)).to(k.dtype)


def align_rope(
    k: torch.Tensor, from_pos: torch.Tensor, to_pos: torch.Tensor, table: RopeTable
) -> torch.Tensor:
    """Move keys rotated at ``from_pos`` to ``to_pos`` (k: [N, H, D]; positions: [N] int64).

    Rotating by Δ then by -Δ is the identity (to float precision).
    """
    if k.numel() == 0 or torch.equal(from_pos, to_pos):
        return k.clone()
    cd, sd = delta_rotation(from_pos, to_pos, table)
    kd = k.double()
    return (kd * cd + rotate_half(kd) * sd).to(k.dtype)


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
