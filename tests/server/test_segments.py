"""Pinned segments: 501 while the engine lacks them; create / list / delete when it has them."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sparsex import LLM
from sparsex.server.app import create_app
from sparsex.server.background import BackgroundServer
from tests.server.helpers import httpx, make_llm
from tests.server.test_errors import assert_error

DOCS = {"documents": ["The while loop repeats.", {"text": "A class bundles data and code."}], "namespace": "kb"}


@dataclass
class PinnedSegment:
    id: str
    namespace: str
    num_tokens: int


class PinnableLLM:
    """A real engine plus in-memory pinning, with the method names the server looks for."""

    def __init__(self, llm: LLM) -> None:
        self._llm = llm
        self._pinned: dict[str, PinnedSegment] = {}
        self._ids = itertools.count()
        self.names: list[str] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def cache_segments(self, docs: list[str], namespace: str = "", names: list[str] | None = None) -> list[str]:
        ids = []
        for d in docs:
            seg = PinnedSegment(f"seg-{next(self._ids)}", namespace, len(self._llm.tokenizer.encode(d)))
            self._pinned[seg.id] = seg
            ids.append(seg.id)
        self.names = names
        return ids

    def list_segments(self) -> list[PinnedSegment]:
        return list(self._pinned.values())

    def uncache_segments(self, ids: list[str]) -> int:
        return sum(self._pinned.pop(i, None) is not None for i in ids)


@pytest.fixture
def pinnable(model_dir: Path) -> PinnableLLM:
    return PinnableLLM(make_llm(model_dir))


@pytest.fixture
def pinning_server(pinnable: PinnableLLM) -> Iterator[Any]:
    with BackgroundServer(create_app(pinnable)) as srv:  # type: ignore[arg-type]
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            yield http


def exercise_segments(http: Any) -> None:
    r = http.post("/v1/segments", json=DOCS)
    assert r.status_code == 200, r.text
    created = r.json()["data"]
    assert len(created) == 2 and all(s["object"] == "segment" and "id" in s for s in created)
    listed = http.get("/v1/segments").json()["data"]
    assert {str(s["id"]) for s in created} <= {str(s["id"]) for s in listed}
    first = str(created[0]["id"])
    r = http.delete(f"/v1/segments/{first}")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert first not in {str(s["id"]) for s in http.get("/v1/segments").json()["data"]}
    assert_error(http.delete(f"/v1/segments/{first}"), 404, code="segment_not_found")
    assert_error(http.delete("/v1/segments/does-not-exist"), 404)


def test_segments_through_the_server(pinning_server: Any, pinnable: PinnableLLM) -> None:
    exercise_segments(pinning_server)
    created = pinning_server.post("/v1/segments", json={"documents": ["x"]}).json()["data"]
    assert created[0]["namespace"] == "" and created[0]["num_tokens"] >= 1  # details from the listing
    assert pinnable.names is None
    pinning_server.post("/v1/segments", json={"documents": [{"text": "y", "name": "why"}, "z"]})
    assert pinnable.names == ["why", ""]
    kb = pinning_server.get("/v1/segments", params={"namespace": "kb"}).json()["data"]
    assert kb and all(s["namespace"] == "kb" for s in kb)


def test_segment_requests_are_validated(pinning_server: Any) -> None:
    assert_error(pinning_server.post("/v1/segments", json={"documents": []}), 400, param="documents")
    assert_error(pinning_server.post("/v1/segments", json={"documents": [""]}), 400, param="documents[0]")
    assert_error(pinning_server.post("/v1/segments", json={"namespace": "kb"}), 400, param="documents")


class NoSegmentsLLM:
    """A real engine that hides its segment methods, as an engine without them would be."""

    def __init__(self, llm: LLM) -> None:
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        if name.endswith("_segments"):
            raise AttributeError(name)
        return getattr(self._llm, name)


def test_segments_answer_501_without_engine_support(model_dir: Path) -> None:
    with BackgroundServer(create_app(NoSegmentsLLM(make_llm(model_dir)))) as srv:  # type: ignore[arg-type]
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            assert_error(http.post("/v1/segments", json=DOCS), 501, code="not_implemented")
            assert_error(http.get("/v1/segments"), 501, code="not_implemented")
            assert_error(http.delete("/v1/segments/abc"), 501, code="not_implemented")
            assert_error(http.post("/v1/segments", json={"documents": []}), 400)  # bad input is still a 400


@pytest.mark.skipif(not hasattr(LLM, "cache_segments"), reason="the engine has no pinned segments yet")
def test_segments_on_the_real_engine(http: Any) -> None:
    exercise_segments(http)
