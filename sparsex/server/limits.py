"""Reading a request body safely: JSON only, bounded size, bounded nesting, strict JSON, valid Unicode.

Every check runs before the body reaches pydantic or the engine, so a hostile body costs at most
``max_body_bytes`` of memory and a linear scan, and fails with a 4xx, never a 500:

- media type: only ``application/json`` (415 otherwise, a missing header too): a browser page can
  send ``text/plain`` or a typeless body cross-site without a CORS preflight, never JSON;
- size: ``Content-Length`` (ASCII digits) is checked first, then the bytes actually read;
- a client that disconnects before its whole body arrived gets a 400 (``client_disconnected``;
  nobody reads it, but it is counted as a client error, not logged as a server failure);
- nesting: ``[[[[...`` 100,000 levels deep made ``json.loads`` raise ``RecursionError`` (a 500);
  it is caught, and what parses is walked (without recursion) against ``max_json_depth``;
- JSON: ``NaN`` / ``Infinity`` literals and numbers that overflow (``1e999``) are refused;
- Unicode: a lone surrogate (``"\\ud800"``) anywhere is refused: such a string cannot be encoded
  as UTF-8, which the tokenizer and the cache's hashing need.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.requests import ClientDisconnect, Request

from sparsex.server.protocol import APIError, bad_request

JSON_MEDIA_TYPE = "application/json"


class BodyTooLargeError(APIError):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(400, f"the request body is larger than {max_bytes} bytes", code="body_too_large")


def is_ascii_number(text: str) -> bool:
    """Only ASCII digits (``str.isdigit`` also takes ``²``, ``①``, fullwidth and Arabic-Indic digits)."""
    return text.isascii() and text.isdigit()


def check_json_media_type(request: Request) -> None:
    """A 415 unless the body is declared ``application/json`` (parameters such as charset allowed)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != JSON_MEDIA_TYPE:
        raise APIError(415, f"the request body must be JSON sent as 'Content-Type: {JSON_MEDIA_TYPE}'",
                       param="content-type", code="unsupported_media_type")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, or a 400 as soon as it passes ``max_bytes`` or the client goes away."""
    length = request.headers.get("content-length", "")
    if is_ascii_number(length) and int(length) > max_bytes:
        raise BodyTooLargeError(max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise BodyTooLargeError(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        raise bad_request("the client disconnected before sending the whole body",
                          code="client_disconnected") from None
    return b"".join(chunks)


def json_depth(value: Any) -> int:
    """How deeply lists / dicts nest in a parsed JSON value (a scalar is 0; walked with a stack)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            stack.extend((x, depth + 1) for x in item if isinstance(x, (list, dict)))
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def parse_json(raw: bytes, max_depth: int) -> dict[str, Any]:
    """A JSON object from ``raw``, or a 400 (``code="invalid_json"``)."""
    too_deep = bad_request(f"the JSON body nests deeper than {max_depth} levels", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise too_deep from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of too many digits
        raise bad_request(f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    # Fewer brackets than the limit cannot nest deeper than it: skip the walk for ordinary bodies.
    if raw.count(b"[") + raw.count(b"{") > max_depth and json_depth(body) > max_depth:
        raise too_deep
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("the body contains a string that is not valid Unicode (a lone surrogate)",
                          code="invalid_unicode") from None
    return body


async def read_json(request: Request, max_bytes: int, max_depth: int) -> dict[str, Any]:
    """The JSON object of the body, after every check of the module doc."""
    check_json_media_type(request)
    return parse_json(await read_body(request, max_bytes), max_depth)
