"""Pinned segments: ``POST/GET /v1/segments``, ``DELETE /v1/segments/{id}``, scoped to the tenant.

Pinning submits one engine request per document (``add_pin``), tracked by the engine loop like any
completion, so a long pin is prefilled in chunks between other requests' steps instead of holding
the engine thread; listing and unpinning are calls on the engine thread. A tenant's documents are pinned in its own namespace (``auth.namespace_for``);
it lists only its own segments, with namespaces as it named them, and another tenant's segment id
is a 404, the same as an id that does not exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sparsex.server.auth import client_namespace, engine_tenant, namespace_for, owns
from sparsex.server.engine_loop import EngineLoop
from sparsex.server.protocol import APIError, SegmentsRequest, parse_body
from sparsex.server.responses import failure
from sparsex.server.serving import submit

if TYPE_CHECKING:
    from sparsex.core.request import Request
    from sparsex.server.engine_api import ServedLLM


def segment_json(tenant: str | None, seg: dict[str, Any]) -> dict[str, Any]:
    """An engine segment record as the tenant sees it."""
    out = {"object": "segment", **seg, "id": str(seg["id"])}
    if "namespace" in out:
        out["namespace"] = client_namespace(tenant, str(out["namespace"]))
    return out


def _own_segments(llm: ServedLLM, tenant: str | None) -> list[dict[str, Any]]:
    return [s for s in llm.list_segments() if owns(tenant, str(s.get("namespace", "")))]


def _not_found(segment_id: str) -> APIError:
    return APIError(404, f"no segment with id {segment_id!r}", type="not_found_error", param="segment_id",
                    code="segment_not_found")


class SegmentService:
    """The segment endpoints; every engine call runs on the engine thread."""

    def __init__(self, engine: EngineLoop) -> None:
        self.engine = engine

    async def create(self, body: dict[str, Any], tenant: str | None) -> dict[str, Any]:
        req = parse_body(SegmentsRequest, body)
        docs, names = req.texts(), req.names()
        namespace = namespace_for(tenant, req.namespace)
        pins: list[Request] = []

        def add(llm: ServedLLM) -> list[Request]:
            try:
                for i, doc in enumerate(docs):
                    pins.append(llm.add_pin(doc, namespace, names[i] if names else None, engine_tenant(tenant)))
            except BaseException:
                for p in pins:  # all or nothing
                    llm.abort(p)
                raise
            return list(pins)

        sub = await submit(self.engine, add, len(docs), param="documents", tenant=tenant)
        pending = len(docs)
        while pending:  # the loop reports each pin once it is done (or failed, or aborted)
            ev = await sub.events.get()
            if ev.finish_reason is not None:
                pending -= 1
                err = failure(ev.finish_reason)
                if err is not None:
                    self.engine.abort(sub)
                    raise err
        ids = [str(p.pinned_segment_id) for p in pins]  # set by the engine before it reported them
        listed = {str(s["id"]): s for s in await self.engine.call(lambda llm: llm.list_segments(namespace))}
        return {"object": "list", "data": [segment_json(tenant, listed.get(i, {"id": i, "namespace": namespace}))
                                           for i in ids]}

    async def list(self, tenant: str | None, namespace: str | None = None) -> dict[str, Any]:
        data = [segment_json(tenant, s) for s in await self.engine.call(lambda llm: _own_segments(llm, tenant))]
        if namespace is not None:
            data = [d for d in data if d.get("namespace") == namespace]
        return {"object": "list", "data": data}

    async def delete(self, segment_id: str, tenant: str | None) -> dict[str, Any]:
        def unpin(llm: ServedLLM) -> int:
            if segment_id not in {str(s["id"]) for s in _own_segments(llm, tenant)}:
                return 0
            return llm.uncache_segments([segment_id])

        if not await self.engine.call(unpin):
            raise _not_found(segment_id)
        return {"id": segment_id, "object": "segment", "deleted": True}
