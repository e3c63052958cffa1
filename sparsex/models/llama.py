"""Llama family: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm). One file, top to bottom.

Weights keep transformers' names except two fusions done at load time:
``qkv_proj = cat(q_proj, k_proj, v_proj)`` and ``gate_up_proj = cat(gate_proj, up_proj)``.
Q and K rows (and the Qwen3 q/k norms) are put in RoPE's pair layout (see ``rope.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsex.models.attention import paged_attention
from sparsex.models.base import ModelSpec, StepContext, fuse_qkv, rms_norm, split_qkv
from sparsex.models.rope import apply_rope, build_rope_table, to_pair_layout

FAMILY_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def llama_spec(cfg: Any) -> ModelSpec:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n = cfg.num_hidden_layers
    if cfg.model_type == "mistral":
        windows: list[int | None] = [getattr(cfg, "sliding_window", None)] * n
    else:
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
        windows = [cfg.sliding_window if t == "sliding_attention" else None for t in types]
    table = build_rope_table(cfg)
    return ModelSpec(
        model_type=cfg.model_type,
        num_layers=n,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_position=cfg.max_position_embeddings,
        windows=windows,
        rope=[table] * n,
        attn_scale=head_dim**-0.5,
        family="llama",
    )


class LlamaLayer(nn.Module):
    def __init__(self, cfg: Any, spec: ModelSpec) -> None:
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.nq, self.nkv = spec.num_heads * d, spec.num_kv_heads * d
        bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
        self.qkv_proj = nn.Linear(h, self.nq + 2 * self.nkv, bias=bias)
        self.o_proj = nn.Linear(spec.num_heads * d, h, bias=bool(getattr(cfg, "attention_bias", False)))
        self.gate_up_proj = nn.Linear(h, 2 * cfg.intermediate_size, bias=bool(getattr(cfg, "mlp_bias", False)))
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=bool(getattr(cfg, "mlp_bias", False)))
        self.input_layernorm = nn.Parameter(torch.ones(h))
        self.post_attention_layernorm = nn.Parameter(torch.ones(h))
        self.qk_norm = cfg.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(d))
            self.k_norm = nn.Parameter(torch.ones(d))
        self.eps = cfg.rms_norm_eps
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} for {cfg.model_type}")


class LlamaModel(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.spec = llama_spec(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(cfg, self.spec) for _ in range(self.spec.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.tie = bool(getattr(cfg, "tie_word_embeddings", False))
        if not self.tie:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.eps = cfg.rms_norm_eps
        self.head: nn.Module | None = None  # a packed output projection (models/linear.py), if any

    def output_weight(self) -> torch.Tensor:
        """[V, H]: the LM head's weight, or the tied embedding."""
        return self.embed_tokens.weight if self.tie else self.lm_head.weight

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.embed_tokens(token_ids)  # [N, H]
        return x

    def qkv(self, i: int, x: torch.Tensor, step: StepContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``i``'s attention inputs for hidden states x: [N, H] -> q [N, Hq, D], k, v [N, Hkv, D]."""
        layer: LlamaLayer = self.layers[i]  # type: ignore[assignment]
        spec = self.spec
        h = rms_norm(x, layer.input_layernorm, layer.eps)
        q, k, v = split_qkv(layer.qkv_proj(h), spec)  # q [N, Hq, D], k, v [N, Hkv, D]
        if layer.qk_norm:
            q = rms_norm(q, layer.q_norm, layer.eps)
            k = rms_norm(k, layer.k_norm, layer.eps)
        rot = step.rotary(spec.rope[i])
        return apply_rope(q, rot), apply_rope(k, rot), v

    def layer_forward(self, i: int, x: torch.Tensor, step: StepContext) -> torch.Tensor:
        layer: LlamaLayer = self.layers[i]  # type: ignore[assignment]
        spec, n = self.spec, x.shape[0]
        q, k, v = self.qkv(i, x, step)
        attn = paged_attention(i, q, k, v, step, scale=spec.attn_scale, window=spec.windows[i])
        x = x + layer.o_proj(attn.reshape(n, -1))
        h = rms_norm(x, layer.post_attention_layernorm, layer.eps)
        gate, up = layer.gate_up_proj(h).chunk(2, dim=-1)  # [N, I] each
        out: torch.Tensor = x + layer.down_proj(F.silu(gate) * up)
        return out

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.norm, self.eps)
        if self.head is not None:
            out: torch.Tensor = self.head(h)
            return out
        return h @ self.output_weight().T  # [N, V]

    @staticmethod
    def convert_state_dict(sd: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
        """transformers names -> ours (fused qkv and gate_up)."""
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        out: dict[str, torch.Tensor] = {}
        out["embed_tokens.weight"] = sd["model.embed_tokens.weight"]
        out["norm"] = sd["model.norm.weight"]
        if not getattr(cfg, "tie_word_embeddings", False):
            out["lm_head.weight"] = sd["lm_head.weight"]
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            for suffix in ("weight", "bias"):
                q, k, v = (sd.get(f"{a}{n}_proj.{suffix}") for n in "qkv")
                if q is not None and k is not None and v is not None:
                    out[f"layers.{i}.qkv_proj.{suffix}"] = fuse_qkv(q, k, v, d)
                if f"{a}o_proj.{suffix}" in sd:
                    out[f"layers.{i}.o_proj.{suffix}"] = sd[f"{a}o_proj.{suffix}"]
                g, u = sd.get(f"{p}mlp.gate_proj.{suffix}"), sd.get(f"{p}mlp.up_proj.{suffix}")
                if g is not None and u is not None:
                    out[f"layers.{i}.gate_up_proj.{suffix}"] = torch.cat([g, u], dim=0)
                if f"{p}mlp.down_proj.{suffix}" in sd:
                    out[f"layers.{i}.down_proj.{suffix}"] = sd[f"{p}mlp.down_proj.{suffix}"]
            out[f"layers.{i}.input_layernorm"] = sd[p + "input_layernorm.weight"]
            out[f"layers.{i}.post_attention_layernorm"] = sd[p + "post_attention_layernorm.weight"]
            if cfg.model_type == "qwen3":
                out[f"layers.{i}.q_norm"] = to_pair_layout(sd[a + "q_norm.weight"], d)
                out[f"layers.{i}.k_norm"] = to_pair_layout(sd[a + "k_norm.weight"], d)
        return out
