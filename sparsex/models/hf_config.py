"""Read a model folder's config.json without importing transformers (it costs ~2.5 s to import).

Missing keys get the defaults transformers' config classes use for the supported families.
RoPE settings are normalised into ``rope_parameters`` (per layer type for Gemma 3).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

_COMMON: dict[str, Any] = {
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "head_dim": None,
    "sliding_window": None,
    "layer_types": None,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 4096, "max_position_embeddings": 4096 * 32},
    "qwen2": {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
              "rope_theta": 10000.0, "max_position_embeddings": 32768},
    "qwen3": {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
              "head_dim": 128, "max_position_embeddings": 32768},
    "gemma3_text": {"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "head_dim": 256,
                    "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "final_logit_softcapping": None,
                    "attn_logit_softcapping": None, "max_position_embeddings": 131072,
                    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                    "sliding_window_pattern": 6},
}


def read_config(folder: Path) -> SimpleNamespace:
    """config.json of ``folder`` as an attribute namespace with family defaults filled in."""
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") == "gemma3" and "text_config" in raw:
        raw = {"model_type": "gemma3_text", **raw["text_config"]}
    mt = raw.get("model_type", "")
    cfg = {**_COMMON, **_DEFAULTS.get(mt, {}), **raw}
    n = cfg.get("num_hidden_layers", 0)
    if mt in ("qwen2", "qwen3") and not cfg.get("layer_types"):
        win = cfg["sliding_window"] if cfg.get("use_sliding_window") else None
        cfg["sliding_window"] = win
        cfg["layer_types"] = [
            "sliding_attention" if win is not None and i >= cfg["max_window_layers"] else "full_attention"
            for i in range(n)
        ]
    if mt == "gemma3_text":
        if not cfg.get("layer_types"):
            pat = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
            cfg["layer_types"] = [
                "full_attention" if (i + 1) % pat == 0 else "sliding_attention" for i in range(n)
            ]
        if "rope_parameters" not in raw:
            scaling = raw.get("rope_scaling") or {"rope_type": "default"}
            full = {"rope_type": scaling.get("rope_type", scaling.get("type", "default")), **scaling,
                    "rope_theta": cfg["rope_theta"]}
            cfg["rope_parameters"] = {
                "full_attention": full,
                "sliding_attention": {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]},
            }
    elif "rope_parameters" not in raw:
        scaling = raw.get("rope_scaling") or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        cfg["rope_parameters"] = {**scaling, "rope_type": rope_type, "rope_theta": cfg["rope_theta"]}
    cfg["_folder"] = str(folder)
    return SimpleNamespace(**cfg)


def transformers_config(cfg: SimpleNamespace) -> Any:
    """The transformers config object for ``cfg`` (for RoPE variants we delegate to transformers)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(cfg._folder)
    return getattr(c, "text_config", None) if c.model_type == "gemma3" else c
