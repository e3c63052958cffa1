"""Pinned segments on the real engine: create, list, delete, validation, odd ids."""

from __future__ import annotations

from typing import Any

from tests.server.test_errors import assert_error

DOCS = {"documents": ["The while loop repeats.", {"text": "A class bundles data and code.", "name": "cls"}],
        "namespace": "kb"}


def test_segments_through_the_server(http: Any) -> None:
    r = http.post("/v1/segments", json=DOCS)
    assert r.status_code == 200, r.text
    created = r.json()["data"]
    assert len(created) == 2 and all(s["object"] == "segment" and s["namespace"] == "kb" for s in created)
    assert created[1]["name"] == "cls" and created[0]["num_tokens"] >= 1  # details from the listing
    listed = http.get("/v1/segments").json()["data"]
    assert {s["id"] for s in created} <= {s["id"] for s in listed}
    kb = http.get("/v1/segments", params={"namespace": "kb"}).json()["data"]
    assert kb and all(s["namespace"] == "kb" for s in kb)
    first = created[0]["id"]
    r = http.delete(f"/v1/segments/{first}")
    assert r.status_code == 200 and r.json() == {"id": first, "object": "segment", "deleted": True}
    assert first not in {s["id"] for s in http.get("/v1/segments").json()["data"]}
    assert_error(http.delete(f"/v1/segments/{first}"), 404, code="segment_not_found")
    assert_error(http.delete("/v1/segments/does-not-exist"), 404)
    http.delete(f"/v1/segments/{created[1]['id']}")


def test_segment_requests_are_validated(http: Any) -> None:
    assert_error(http.post("/v1/segments", json={"documents": []}), 400, param="documents")
    assert_error(http.post("/v1/segments", json={"documents": [""]}), 400, param="documents[0]")
    assert_error(http.post("/v1/segments", json={"namespace": "kb"}), 400, param="documents")
    assert_error(http.post("/v1/segments", json={"documents": ["x"], "namespace": 3}), 400, param="namespace")
    assert_error(http.post("/v1/segments", json={"documents": [{"text": "x", "name": 5}]}), 400,
                 param="documents[0].name")


def test_odd_segment_ids_are_404_json(http: Any) -> None:
    """``%2F`` and friends reach the route as an id (a 404), never a redirect (issue 15, item 8)."""
    for path in ("/v1/segments/%2F", "/v1/segments/%2F%2F", "/v1/segments/a%2Fb", "/v1/segments/%00",
                 "/v1/segments/..%2F..%2Fetc"):
        r = http.delete(path, follow_redirects=False)
        assert_error(r, 404, code="segment_not_found")
