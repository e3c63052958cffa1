"""Helpers shared by the server tests."""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sparsex import LLM

try:  # the HTTP client the openai package is built on (published as httpx or httpx2)
    import httpx
except ImportError:  # pragma: no cover - depends on the environment
    import httpx2 as httpx  # type: ignore[no-redef]

__all__ = ["KV_MEMORY", "httpx", "make_llm", "sse_events", "wait_until"]

KV_MEMORY = 64 << 20


def make_llm(folder: Path) -> LLM:
    """An engine on the tiny model whose default is full prefill, so greedy outputs are exact.

    Requests that want reuse ask for it (``sparsex.reuse``); older engines without the option
    always do full prefill.
    """
    kwargs: dict[str, Any] = {"reuse": "none"} if "reuse" in inspect.signature(LLM.__init__).parameters else {}
    return LLM(model=str(folder), kv_cache_memory=KV_MEMORY, **kwargs)


def sse_events(lines: Iterable[str]) -> list[Any]:
    """The JSON payloads of an SSE stream's ``data:`` lines; ``[DONE]`` stays a string."""
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``cond`` until it holds; fail after ``timeout`` seconds (tests never time anything else)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
