"""Tenants from API keys: 401 without a key, no cross-tenant cache hit, listing or deletion."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sparsex.server.app import create_app
from sparsex.server.auth import Tenants, namespace_for, owns
from sparsex.server.background import BackgroundServer
from tests.server.helpers import httpx, make_llm
from tests.server.test_errors import assert_error

KEYS = {"key-alice": "alice", "key-bob": "bob"}
SECRET = " ".join(["Alice's secret document: the vault code is 4417 and the spare key is under the mat."] * 4)


@pytest.fixture(scope="module")
def tenant_server(model_dir: Path) -> Iterator[BackgroundServer]:
    app = create_app(make_llm(model_dir), tenants=Tenants.from_keys(KEYS), metrics="key", metrics_key="m-key",
                     default_max_tokens=2)
    with BackgroundServer(app) as srv:
        yield srv


def client_for(srv: BackgroundServer, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=srv.url, timeout=60, headers=headers)


@pytest.fixture
def alice(tenant_server: BackgroundServer) -> Iterator[Any]:
    with client_for(tenant_server, "key-alice") as c:
        yield c


@pytest.fixture
def bob(tenant_server: BackgroundServer) -> Iterator[Any]:
    with client_for(tenant_server, "key-bob") as c:
        yield c


def hits(http: Any, salt: str | None = None) -> int:
    body: dict[str, Any] = {"prompt": SECRET, "max_tokens": 1, "temperature": 0, "sparsex": {"reuse": "prefix"}}
    if salt is not None:
        body["cache_salt"] = salt
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    return int(usage["prefix_hit_tokens"]) + int(usage["segment_hit_tokens"])


def test_namespaces_cannot_cross_tenants() -> None:
    assert namespace_for("alice", "kb") == "alice/kb" and namespace_for(None, "kb") == "kb"
    # Whatever bob's client sends, his namespace starts with "bob/", which no tenant name can end in.
    for claim in ("alice", "alice/", "alice/kb", "/alice/kb", "../alice/kb", ""):
        assert not owns("alice", namespace_for("bob", claim))
    with pytest.raises(ValueError):
        Tenants.from_keys({"k": "alice/kb"})


def test_requests_need_a_valid_key(tenant_server: BackgroundServer) -> None:
    body = {"prompt": "hi", "max_tokens": 1}
    for key in (None, "wrong", "key-alice-but-longer"):
        with client_for(tenant_server, key) as http:
            for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                 ("GET", "/v1/models"), ("GET", "/v1/segments"), ("DELETE", "/v1/segments/x"),
                                 ("POST", "/v1/segments")):
                r = http.request(method, path, json=body if method == "POST" else None)
                assert_error(r, 401, code="invalid_api_key")
                assert r.headers["www-authenticate"] == "Bearer"
            assert http.get("/health").status_code == 200  # for load balancers
    with client_for(tenant_server, "key-alice") as http:
        r = http.post("/v1/completions", headers={"Authorization": "Basic key-alice"}, json=body)
        assert_error(r, 401)


def test_no_cross_tenant_cache_hit(alice: Any, bob: Any) -> None:
    hits(alice)  # alice's document is cached in her tenant
    assert hits(alice) > 0
    assert hits(bob) == 0  # same text, another tenant: a miss
    for claim in ("alice", "alice/", "/"):  # claiming alice's salt reaches only bob's own tenant
        assert hits(bob, claim) == 0
    hits(alice, "team-1")
    assert hits(alice, "team-1") > 0
    assert hits(bob, "team-1") == 0


def test_segments_are_scoped_to_the_tenant(alice: Any, bob: Any) -> None:
    r = alice.post("/v1/segments", json={"documents": [{"text": SECRET, "name": "vault"}], "namespace": "kb"})
    assert r.status_code == 200, r.text
    seg = r.json()["data"][0]
    assert seg["namespace"] == "kb" and seg["name"] == "vault"  # as alice named it
    assert seg["id"] in {s["id"] for s in alice.get("/v1/segments").json()["data"]}
    assert bob.get("/v1/segments").json()["data"] == []
    assert bob.get("/v1/segments", params={"namespace": "kb"}).json()["data"] == []
    assert_error(bob.delete(f"/v1/segments/{seg['id']}"), 404, code="segment_not_found")
    # bob pins the same text in a namespace he calls "kb": his own segment, a different id
    mine = bob.post("/v1/segments", json={"documents": [SECRET], "namespace": "kb"}).json()["data"][0]
    assert mine["id"] != seg["id"]
    assert [s["id"] for s in bob.get("/v1/segments").json()["data"]] == [mine["id"]]
    assert alice.delete(f"/v1/segments/{seg['id']}").json()["deleted"] is True
    assert bob.delete(f"/v1/segments/{mine['id']}").json()["deleted"] is True


def test_metrics_need_their_own_key(tenant_server: BackgroundServer, alice: Any) -> None:
    assert_error(alice.get("/metrics"), 401)  # a tenant's key does not open /metrics
    with client_for(tenant_server, "m-key") as http:
        assert http.get("/metrics").status_code == 200
        assert_error(http.post("/v1/completions", json={"prompt": "x"}), 401)  # nor the reverse


def test_metrics_off(model_dir: Path) -> None:
    with BackgroundServer(create_app(make_llm(model_dir), metrics="off")) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            assert_error(http.get("/metrics"), 404)
