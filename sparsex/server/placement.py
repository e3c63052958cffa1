"""``GET /v1/cache/entries`` and ``GET /v1/cache/events``: what this replica's KV pool holds from
the store, and what changed, for placement.

An existing router or balancer (nginx consistent hashing, a KV-aware router) can ask each replica
which entries it holds and send a request where its documents already are; see docs/DEPLOYMENT.md.
Scoped like the segment endpoints: a tenant sees only its own namespaces, named as its client
named them. Without ``--kv-store`` / ``--kv-disk`` the list is empty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sparsex.server.auth import client_namespace, owns
from sparsex.server.engine_loop import EngineLoop

if TYPE_CHECKING:
    from sparsex.server.engine_api import ServedLLM


async def cache_entries(engine: EngineLoop, tenant: str | None, namespace: str | None = None) -> dict[str, Any]:
    """``{"object": "list", "data": [{"key", "namespace", "num_tokens", "position", "segment_id"}]}``."""

    def own(llm: ServedLLM) -> list[dict[str, Any]]:
        return [e for e in llm.cache_entries() if owns(tenant, str(e["namespace"]))]

    data = [{"object": "cache_entry", **e, "namespace": client_namespace(tenant, str(e["namespace"]))}
            for e in await engine.call(own)]
    if namespace is not None:
        data = [d for d in data if d["namespace"] == namespace]
    return {"object": "list", "data": data}


async def cache_events(engine: EngineLoop, tenant: str | None, since: int = 0) -> dict[str, Any]:
    """``{"object": "list", "data": [{"seq", "kind", "key", "namespace", "num_tokens", "tier"}], "last_seq"}``:
    events after ``since`` (``published``, ``promoted``, ``pinned``, ``unpinned``; the last 1024 are
    kept). Poll with ``since`` = the previous answer's ``last_seq``."""

    def own(llm: ServedLLM) -> list[dict[str, Any]]:
        return [e for e in llm.cache_events(since) if owns(tenant, str(e["namespace"]))]

    data = [{"object": "cache_event", **e, "namespace": client_namespace(tenant, str(e["namespace"]))}
            for e in await engine.call(own)]
    return {"object": "list", "data": data, "last_seq": max((int(d["seq"]) for d in data), default=since)}
