"""Models named by their Hugging Face Hub id: ``org/name`` or ``org/name:file.gguf``.

    "Qwen/Qwen3-0.6B"                     config.json first (is the architecture supported?), then
                                          tokenizer files + safetensors (snapshot_download, filtered)
    "org/name-GGUF:model-Q4_K_M.gguf"     that one file (hf_hub_download), converted like a local .gguf

Files land in the Hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``) with ``huggingface_hub``'s progress bars, and the snapshot folder is
then loaded as a local folder is. The environment is read at each call, not at import:
``HF_TOKEN`` (gated / private repositories), ``HF_HUB_OFFLINE=1`` (cache only), ``HF_ENDPOINT``
(a mirror). Every failure becomes one :class:`HubModelError` that says what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text")
"""``model_type`` values of the supported families (a multimodal Gemma 3 repo loads its text part)."""

ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
]
"""What a snapshot downloads: config, tokenizer and the transformers-format safetensors weights
(``model.safetensors`` or its shards; not .bin, .pt, .gguf, nor other formats' safetensors)."""

_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[^/:]+\.gguf)?$")
_TRUE = {"1", "on", "yes", "true"}


class HubModelError(ValueError):
    """A Hub model could not be fetched or is not supported; the message says what to do."""


@dataclass(frozen=True)
class HubRef:
    """A parsed Hub model name: the repository, and the GGUF file inside it (if one is named)."""

    repo_id: str
    gguf_file: str | None = None


def parse_hub_id(name: str) -> HubRef | None:
    """``org/name`` or ``org/name:file.gguf`` -> HubRef; anything else (a path, an alias) -> None."""
    if not _ID.match(name) or ".." in name:
        return None
    repo, _, gguf = name.partition(":")
    return HubRef(repo, gguf or None)


def _hub_env() -> dict[str, Any]:
    """Keyword arguments every download gets, from the environment as it is now."""
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(Path.home(), ".cache", "huggingface"), "hub")
    offline = (os.environ.get("HF_HUB_OFFLINE") or "").strip().lower() in _TRUE
    return {"cache_dir": os.path.expanduser(cache), "local_files_only": offline,
            "token": os.environ.get("HF_TOKEN") or None, "endpoint": os.environ.get("HF_ENDPOINT") or None}


def fetch_model(name: str, revision: str | None = None) -> Path:
    """A local model folder (or a ``.gguf`` file) for the Hub id ``name`` at ``revision``."""
    ref = parse_hub_id(name)
    if ref is None:
        raise HubModelError(f"{name!r} is not a Hub id (org/name or org/name:file.gguf)")
    from huggingface_hub import hf_hub_download, snapshot_download

    env = _hub_env()
    with _explained(name, revision, env):
        if ref.gguf_file is not None:
            return Path(hf_hub_download(ref.repo_id, ref.gguf_file, revision=revision, **env))
        config = Path(hf_hub_download(ref.repo_id, "config.json", revision=revision, **env))
        check_architecture(name, config)
        folder = Path(snapshot_download(ref.repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, **env))
    if not any(folder.glob("model*.safetensors")):
        raise HubModelError(f"{name!r} has no .safetensors weights (only .bin / .pt?); SparseX loads "
                            "safetensors or a GGUF file: try a repository that ships them, or "
                            f"'{name}:<file>.gguf' for a GGUF repository")
    return folder


def check_architecture(name: str, config_file: Path) -> None:
    """Raise HubModelError if the config's ``model_type`` is not one SparseX runs."""
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise HubModelError(f"{name!r}: unreadable config.json ({e})") from e
    if model_type not in SUPPORTED_TYPES:
        raise HubModelError(
            f"{name!r} is a {model_type!r} model, an architecture SparseX does not support; supported: "
            "Llama, Mistral, Qwen2, Qwen3, Gemma 3 (model_type "
            f"{', '.join(SUPPORTED_TYPES)}). Pick a model of one of these families"
        )


@contextlib.contextmanager
def _explained(name: str, revision: str | None, env: dict[str, Any]) -> Iterator[None]:
    """Turns huggingface_hub's exceptions into one HubModelError naming the fix."""
    try:
        yield
    except HubModelError:
        raise
    except Exception as exc:
        message = _explain(exc, name, revision or "main", env["cache_dir"], env["local_files_only"])
        if message is None:
            raise
        raise HubModelError(message) from exc


def _explain(exc: BaseException, name: str, rev: str, cache: str, offline: bool) -> str | None:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):  # a subclass of RepositoryNotFoundError: first
        return (f"{name!r} is a gated repository: accept its license on its Hub page, then set HF_TOKEN "
                "to a token of that account (https://huggingface.co/settings/tokens)")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (f"{name!r} was not found on the Hub: check the id (org/name); a private repository "
                "needs HF_TOKEN set to a token that can read it")
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{name!r} has no revision {rev!r}: pass an existing branch, tag or commit (--revision)"
    # LocalEntryNotFoundError is an EntryNotFoundError too: first
    if isinstance(exc, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        if offline:
            return (f"{name!r} ({rev}) is not in the Hugging Face cache at {cache} and HF_HUB_OFFLINE is "
                    "set: unset HF_HUB_OFFLINE to download it, or download it where the Hub is reachable "
                    f"(`hf download {name.split(':')[0]}`) and copy the cache here")
        return (f"cannot reach the Hugging Face Hub to download {name!r} and it is not in the cache at "
                f"{cache}: check the network (or HF_ENDPOINT for a mirror), or download it where the Hub "
                "is reachable and copy the cache here")
    if isinstance(exc, errors.EntryNotFoundError):
        return (f"{name!r} at {rev!r} lacks a file SparseX needs (config.json, or the .gguf named): "
                "check the file name; a GGUF-only repository is named org/name:<file>.gguf")
    if isinstance(exc, errors.HfHubHTTPError):
        return f"downloading {name!r} from the Hub failed: {exc}"
    return None
