"""``GET /v1/cache/entries`` and ``GET /v1/cache/events``: what this replica's KV pool holds from
the store, and what changed, for placement.

An existing router or balancer (nginx consistent hashing, a KV-aware router) can ask each replica
which entries it holds and send a request where its documents already are; see docs/DEPLOYMENT.md.
Scoped like the segment endpoints: a tenant sees only its own namespaces, named as its client
named them. Without ``--kv-store`` / ``--kv-disk`` the list is empty.

Event sequence numbers are the tenant's own (``TenantEvents``): they count only its events, so a
tenant cannot tell from them how much the others do.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from sparsex.server.auth import client_namespace, owns, tenant_of
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


MAX_TENANT_EVENTS = 1024
"""Events kept per tenant (the engine keeps its last 1024 of all tenants')."""


class TenantEvents:
    """The engine's store events, numbered per tenant: each tenant's ``seq`` goes 1, 2, 3, ... over
    its own events only. Fed by ``pull`` on the engine thread after every step (and before every
    read), so that no tenant's events are lost however busy the others are; read on the same thread.

    keyed: whether the server has API keys (else every client shares one tenant, ``None``).
    """

    def __init__(self, keyed: bool, max_events: int = MAX_TENANT_EVENTS) -> None:
        self.keyed = keyed
        self.max_events = max_events
        self._cursor = 0  # the engine's last sequence number seen
        self._logs: dict[str | None, deque[dict[str, Any]]] = {}
        self._counts: dict[str | None, int] = {}

    def pull(self, llm: ServedLLM) -> None:
        """Take the engine's events since the last pull, renumbered per tenant."""
        for event in llm.cache_events(self._cursor):
            self._cursor = max(self._cursor, int(event["seq"]))
            namespace = str(event["namespace"])
            tenant = tenant_of(namespace) if self.keyed else None
            if self.keyed and tenant is None:
                continue  # not a tenant's namespace (the engine's own)
            seq = self._counts[tenant] = self._counts.get(tenant, 0) + 1
            log = self._logs.setdefault(tenant, deque(maxlen=self.max_events))
            log.append({**event, "seq": seq, "namespace": client_namespace(tenant, namespace)})

    def since(self, tenant: str | None, seq: int) -> list[dict[str, Any]]:
        """The tenant's events after its sequence number ``seq``, oldest first."""
        log = self._logs.get(tenant, ())
        return [e for e in log if e["seq"] > seq]


async def cache_events(engine: EngineLoop, events: TenantEvents, tenant: str | None, since: int = 0) -> dict[str, Any]:
    """``{"object": "list", "data": [{"seq", "kind", "key", "namespace", "num_tokens", "tier"}], "last_seq"}``:
    the tenant's events after its sequence number ``since`` (``published``, ``promoted``, ``pinned``,
    ``unpinned``; its last 1024 are kept). Poll with ``since`` = the previous answer's ``last_seq``."""

    def own(llm: ServedLLM) -> list[dict[str, Any]]:
        events.pull(llm)
        return events.since(tenant, since)

    data = [{"object": "cache_event", **e} for e in await engine.call(own)]
    return {"object": "list", "data": data, "last_seq": max((int(d["seq"]) for d in data), default=since)}
