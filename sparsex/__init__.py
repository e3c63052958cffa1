"""SparseX: reuse the KV cache of text segments anywhere in a prompt.

Heavy modules (torch, transformers) load lazily so that the pure-Python
parts (``sparsex.cache``, ``sparsex.core.scheduler``) import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sparsex.sampling_params import SamplingParams
from sparsex.segments import Segment

if TYPE_CHECKING:
    from sparsex.config import EngineConfig
    from sparsex.llm import LLM, RequestOutput

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams", "Segment"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("LLM", "RequestOutput"):
        from sparsex import llm

        return getattr(llm, name)
    if name == "EngineConfig":
        from sparsex.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'sparsex' has no attribute {name!r}")
