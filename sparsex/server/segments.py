"""Pinned segments: ``POST/GET /v1/segments``, ``DELETE /v1/segments/{id}``.

Thin wrappers over the engine's ``cache_segments`` / ``list_segments`` / ``uncache_segments``,
run on the engine thread. An engine without them answers 501; whatever they return (ids,
dataclasses, dicts) is turned into JSON objects with ``"object": "segment"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sparsex.server.engine_loop import EngineLoop
from sparsex.server.protocol import APIError, SegmentsRequest, bad_request, parse_body, parse_json

if TYPE_CHECKING:
    from sparsex.server.engine_api import ServedLLM


def _require(llm: ServedLLM, method: str) -> Callable[..., Any]:
    """The engine's segment method ``method``, or a 501 when the engine lacks it."""
    fn: Callable[..., Any] | None = getattr(llm, method, None)
    if not callable(fn):
        raise APIError(501, f"this engine does not support pinned segments (LLM.{method} is missing)",
                       type="not_implemented_error", code="not_implemented")
    return fn


def _fields(item: Any) -> dict[str, Any]:
    """An engine segment record as a dict with an ``id`` (raw values, not yet JSON-safe)."""
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        out = {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
    elif isinstance(item, dict):
        out = dict(item)
    elif hasattr(item, "__dict__"):
        out = {k: v for k, v in vars(item).items() if not k.startswith("_")}
    else:
        out = {"id": item}
    if "id" not in out:
        for key in ("segment_id", "seg_id", "key"):
            if key in out:
                out["id"] = out[key]
                break
    return out


def segment_json(item: Any) -> dict[str, Any]:
    out = _fields(item)
    if "id" in out and not isinstance(out["id"], (str, int)):
        out["id"] = str(out["id"])
    return {"object": "segment", **{k: v for k, v in out.items() if _is_jsonable(v)}}


def _is_jsonable(v: Any) -> bool:
    if v is None or isinstance(v, (str, int, float, bool)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_is_jsonable(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_jsonable(x) for k, x in v.items())
    return False


def _as_list(result: Any) -> list[Any]:
    if result is None:
        return []
    if isinstance(result, dict):
        return [{"id": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in result.items()]
    if isinstance(result, (list, tuple, set)):
        return list(result)
    return [result]


def _with_details(llm: ServedLLM, created: list[Any]) -> list[Any]:
    """Replace bare segment ids by the engine's listing of them (size, namespace, ...) when it has one."""
    list_segments = getattr(llm, "list_segments", None)
    if not callable(list_segments) or not all(isinstance(x, (str, int)) for x in created):
        return created
    listed = {str(_fields(x).get("id")): x for x in _as_list(list_segments())}
    return [listed.get(str(x), x) for x in created]


class SegmentService:
    """The segment endpoints; every engine call runs on the engine thread."""

    def __init__(self, llm: ServedLLM, engine: EngineLoop) -> None:
        self.llm = llm
        self.engine = engine

    async def create(self, raw: bytes) -> dict[str, Any]:
        body = parse_body(SegmentsRequest, parse_json(raw))
        docs, names = body.texts(), body.names()
        _require(self.llm, "cache_segments")

        def pin(llm: ServedLLM) -> list[Any]:
            cache_segments = _require(llm, "cache_segments")
            kwargs = {"names": names} if names is not None else {}
            created = _as_list(cache_segments(docs, namespace=body.namespace, **kwargs))
            return _with_details(llm, created)

        try:
            created = await self.engine.call(pin)
        except (ValueError, TypeError) as e:
            raise bad_request(str(e), param="documents") from None
        return {"object": "list", "data": [segment_json(x) for x in created]}

    async def list(self, namespace: str | None = None) -> dict[str, Any]:
        _require(self.llm, "list_segments")
        result = await self.engine.call(lambda llm: _require(llm, "list_segments")())
        data = [segment_json(x) for x in _as_list(result)]
        if namespace is not None:
            data = [d for d in data if d.get("namespace") == namespace]
        return {"object": "list", "data": data}

    async def delete(self, segment_id: str) -> dict[str, Any]:
        _require(self.llm, "uncache_segments")

        def unpin(llm: ServedLLM) -> Any:
            key: Any = segment_id
            list_segments = getattr(llm, "list_segments", None)
            if callable(list_segments):
                known = {str(_fields(x).get("id")): _fields(x).get("id") for x in _as_list(list_segments())}
                if segment_id not in known:
                    raise KeyError(segment_id)
                key = known[segment_id]
            return _require(llm, "uncache_segments")([key])

        try:
            result = await self.engine.call(unpin)
        except (KeyError, LookupError):
            raise APIError(404, f"no segment with id {segment_id!r}", param="segment_id",
                           code="segment_not_found") from None
        if result is not None and not result:  # 0, False or an empty list: nothing was removed
            raise APIError(404, f"no segment with id {segment_id!r}", param="segment_id", code="segment_not_found")
        return {"id": segment_id, "object": "segment", "deleted": True}
