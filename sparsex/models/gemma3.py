"""Gemma 3 (text): sliding-window and global layers with their own RoPE bases,
(1 + w) RMSNorms before and after attention and MLP, q/k norms, scaled embeddings,
GELU-tanh MLP and tied embeddings. Fusions at load time as in llama.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsex.models.attention import paged_attention
from sparsex.models.base import ModelSpec, StepContext, fuse_qkv, rms_norm, split_qkv
from sparsex.models.rope import apply_rope, build_rope_table, to_pair_layout

FAMILY_TYPES = ("gemma3_text", "gemma3")


def gemma3_spec(cfg: Any) -> ModelSpec:
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise ValueError("Gemma 3 with attn_logit_softcapping is not supported")
    n = cfg.num_hidden_layers
    tables = {t: build_rope_table(cfg, t) for t in sorted(set(cfg.layer_types))}
    return ModelSpec(
        model_type=cfg.model_type,
        num_layers=n,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_position=cfg.max_position_embeddings,
        windows=[cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types],
        rope=[tables[t] for t in cfg.layer_types],
        attn_scale=float(cfg.query_pre_attn_scalar) ** -0.5,
        family="gemma3",
    )


class Gemma3Layer(nn.Module):
    input_layernorm: nn.Parameter
    post_attention_layernorm: nn.Parameter
    pre_feedforward_layernorm: nn.Parameter
    post_feedforward_layernorm: nn.Parameter

    def __init__(self, cfg: Any, spec: ModelSpec) -> None:
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.nq, self.nkv = spec.num_heads * d, spec.num_kv_heads * d
        bias = bool(cfg.attention_bias)
        self.qkv_proj = nn.Linear(h, self.nq + 2 * self.nkv, bias=bias)
        self.o_proj = nn.Linear(self.nq, h, bias=bias)
        self.gate_up_proj = nn.Linear(h, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, nn.Parameter(torch.zeros(h)))
        self.q_norm = nn.Parameter(torch.zeros(d))
        self.k_norm = nn.Parameter(torch.zeros(d))
        self.eps = cfg.rms_norm_eps


class Gemma3Model(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        act = getattr(cfg, "hidden_activation", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"unsupported Gemma 3 activation {act!r}")
        self.spec = gemma3_spec(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_scale = torch.tensor(cfg.hidden_size**0.5)
        self.layers = nn.ModuleList(Gemma3Layer(cfg, self.spec) for _ in range(self.spec.num_layers))
        self.norm = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.eps = cfg.rms_norm_eps
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.head: nn.Module | None = None  # a packed output projection (models/linear.py), if any

    def output_weight(self) -> torch.Tensor:
        """[V, H]: the tied embedding."""
        return self.embed_tokens.weight

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight
        x: torch.Tensor = self.embed_tokens(token_ids) * self.embed_scale.to(w.dtype)  # [N, H]
        return x

    def qkv(self, i: int, x: torch.Tensor, step: StepContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``i``'s attention inputs for hidden states x: [N, H] -> q [N, Hq, D], k, v [N, Hkv, D]."""
        layer: Gemma3Layer = self.layers[i]  # type: ignore[assignment]
        spec, eps = self.spec, layer.eps
        h = rms_norm(x, layer.input_layernorm, eps, offset=1.0)
        q, k, v = split_qkv(layer.qkv_proj(h), spec)  # q [N, Hq, D], k, v [N, Hkv, D]
        q = rms_norm(q, layer.q_norm, eps, offset=1.0)
        k = rms_norm(k, layer.k_norm, eps, offset=1.0)
        rot = step.rotary(spec.rope[i])
        return apply_rope(q, rot), apply_rope(k, rot), v

    def layer_forward(self, i: int, x: torch.Tensor, step: StepContext) -> torch.Tensor:
        layer: Gemma3Layer = self.layers[i]  # type: ignore[assignment]
        spec, eps, n = self.spec, layer.eps, x.shape[0]
        q, k, v = self.qkv(i, x, step)
        attn = paged_attention(i, q, k, v, step, scale=spec.attn_scale, window=spec.windows[i])
        x = x + rms_norm(layer.o_proj(attn.reshape(n, -1)), layer.post_attention_layernorm, eps, offset=1.0)
        h = rms_norm(x, layer.pre_feedforward_layernorm, eps, offset=1.0)
        gate, up = layer.gate_up_proj(h).chunk(2, dim=-1)
        mlp = layer.down_proj(F.gelu(gate, approximate="tanh") * up)
        return x + rms_norm(mlp, layer.post_feedforward_layernorm, eps, offset=1.0)

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.norm, self.eps, offset=1.0)
        logits: torch.Tensor = self.head(h) if self.head is not None else h @ self.output_weight().T  # [N, V]
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    @staticmethod
    def convert_state_dict(sd: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
        d = cfg.head_dim
        pre = "model.language_model." if any(k.startswith("model.language_model.") for k in sd) else "model."
        out = {"embed_tokens.weight": sd[pre + "embed_tokens.weight"], "norm": sd[pre + "norm.weight"]}
        for i in range(cfg.num_hidden_layers):
            p = f"{pre}layers.{i}."
            a = p + "self_attn."
            for suffix in ("weight", "bias"):
                if f"{a}q_proj.{suffix}" in sd:  # Q and K rows in RoPE's pair layout (rope.py)
                    q, k, v = (sd[f"{a}{n}_proj.{suffix}"] for n in "qkv")
                    out[f"layers.{i}.qkv_proj.{suffix}"] = fuse_qkv(q, k, v, d)
                if f"{a}o_proj.{suffix}" in sd:
                    out[f"layers.{i}.o_proj.{suffix}"] = sd[f"{a}o_proj.{suffix}"]
            out[f"layers.{i}.gate_up_proj.weight"] = torch.cat(
                [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]], dim=0
            )
            out[f"layers.{i}.down_proj.weight"] = sd[p + "mlp.down_proj.weight"]
            for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                         "post_feedforward_layernorm"):
                out[f"layers.{i}.{name}"] = sd[f"{p}{name}.weight"]
            out[f"layers.{i}.q_norm"] = to_pair_layout(sd[a + "q_norm.weight"], d)
            out[f"layers.{i}.k_norm"] = to_pair_layout(sd[a + "k_norm.weight"], d)
        return out
