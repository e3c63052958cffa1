"""What a request may take from the cache and give back to it, whatever its reuse method (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CachePolicy:
    """Cache policy of a request.

    namespace: tenant / cache salt; entries never cross namespaces.
    auto_segments: cut unannotated text into content-defined chunks that can be reused.
    register: publish freshly computed KV into the cache: exact prefix blocks, and every piece of a
        segment that no reused run covers (a block or longer); reused KV is never published.
    register_after_reuse: also publish the pieces that come after a reused token (the default).
        Their tokens ran through every layer, over partly reused KV; without them a passage that
        overlaps an earlier one (neighbouring retrieved chunks) is never cached beyond the overlap.
        False publishes only what lies before the first reused token.
    """

    namespace: str = ""
    auto_segments: bool = True
    register: bool = True
    register_after_reuse: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str):
            raise ValueError(f"namespace must be a string, got {type(self.namespace).__name__}")


POLICY_FIELDS = ("namespace", "auto_segments", "register", "register_after_reuse")
"""The option names of :class:`CachePolicy` (every method accepts them)."""
