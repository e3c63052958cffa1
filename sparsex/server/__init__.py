"""OpenAI-compatible HTTP server over the SparseX engine (see README.md for the layer map)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparsex.server.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from sparsex.server.app import create_app

        return create_app
    raise AttributeError(f"module 'sparsex.server' has no attribute {name!r}")
