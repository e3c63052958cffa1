"""``GET /v1/cache/entries`` (tenant-scoped placement listing) and the store's counters on /metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sparsex import LLM
from sparsex.server.app import create_app
from sparsex.server.auth import Tenants
from sparsex.server.background import BackgroundServer
from tests.server.helpers import KV_MEMORY, httpx

KEYS = {"key-alice": "alice", "key-bob": "bob"}
DOC = " ".join(["The lighthouse keeper logs every passing ship in a green ledger."] * 3)


@pytest.fixture(scope="module")
def store_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    llm = LLM(model=str(model_dir), kv_cache_memory=KV_MEMORY, reuse="none",
              kv_disk=str(tmp_path_factory.mktemp("disk")), kv_store_dtype="float32")
    app = create_app(llm, tenants=Tenants.from_keys(KEYS), metrics="key", metrics_key="m-key")
    with BackgroundServer(app) as srv:
        yield srv
    llm.close()


def client(srv: BackgroundServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=60, headers={"Authorization": f"Bearer {key}"})


def test_entries_are_listed_per_tenant_and_counted_on_metrics(store_server: BackgroundServer) -> None:
    with client(store_server, "key-alice") as alice, client(store_server, "key-bob") as bob:
        r = alice.post("/v1/segments", json={"documents": [DOC], "namespace": "kb"})
        assert r.status_code == 200, r.text
        (seg,) = r.json()["data"]
        listed = alice.get("/v1/cache/entries").json()["data"]
        assert [(e["namespace"], e["segment_id"]) for e in listed] == [("kb", seg["id"])]
        assert listed[0]["key"].startswith("sparsex:{") and listed[0]["num_tokens"] == seg["num_tokens"]
        assert alice.get("/v1/cache/entries", params={"namespace": "other"}).json()["data"] == []
        assert bob.get("/v1/cache/entries").json()["data"] == []
        assert alice.get("/v1/cache/entries", headers={"Authorization": ""}).status_code == 401
        text = alice.get("/metrics", headers={"Authorization": "Bearer m-key"}).text
        assert 'sparsex_kvstore_written_bytes_total{tier="disk"}' in text


def test_serve_flags_reach_the_engine() -> None:
    import argparse

    from sparsex.server import cli

    parser = argparse.ArgumentParser()
    cli.add_serve_arguments(parser)
    args = parser.parse_args(["--kv-store", "redis://cache:6379/0", "--kv-disk", "/var/cache/sx",
                              "--kv-disk-bytes", "20G"])
    assert cli.store_kwargs(args) == {"kv_store": "redis://cache:6379/0", "kv_disk": "/var/cache/sx",
                                      "kv_disk_bytes": 20 << 30}
    assert cli.store_kwargs(parser.parse_args([])) == {}
    with pytest.raises(ValueError, match="not a fraction"):
        cli.store_kwargs(parser.parse_args(["--kv-disk-bytes", "0.5"]))


def test_cache_events_are_polled_per_tenant(store_server: BackgroundServer) -> None:
    with client(store_server, "key-alice") as alice, client(store_server, "key-bob") as bob:
        start = alice.get("/v1/cache/events").json()["last_seq"]
        r = bob.post("/v1/segments", json={"documents": ["Bob's own notes on tide tables. " * 6]})
        assert r.status_code == 200, r.text
        assert alice.get("/v1/cache/events", params={"since": start}).json()["data"] == []
        events = bob.get("/v1/cache/events").json()
        assert [(e["kind"], e["namespace"]) for e in events["data"]][-1] == ("pinned", "")
        assert bob.get("/v1/cache/events", params={"since": events["last_seq"]}).json()["data"] == []
        assert bob.get("/v1/cache/events", params={"since": "-1"}).status_code == 400


def test_event_sequence_numbers_count_only_the_tenants_own(store_server: BackgroundServer) -> None:
    """Bob's activity between two of Alice's polls leaves no gap in Alice's numbers."""
    with client(store_server, "key-alice") as alice, client(store_server, "key-bob") as bob:
        def pin(http: httpx.Client, text: str) -> None:
            assert http.post("/v1/segments", json={"documents": [text * 6]}).status_code == 200

        first = alice.get("/v1/cache/events").json()["last_seq"]
        pin(alice, "Alice's first note on sea charts. ")
        bob_start = bob.get("/v1/cache/events").json()["last_seq"]
        for i in range(3):
            pin(bob, f"Bob's note number {i} on harbour fees. ")
        pin(alice, "Alice's second note on sea charts. ")
        seqs = [e["seq"] for e in alice.get("/v1/cache/events", params={"since": first}).json()["data"]]
        assert seqs == [first + 1, first + 2]
        bob_seqs = [e["seq"] for e in bob.get("/v1/cache/events", params={"since": bob_start}).json()["data"]]
        assert bob_seqs == [bob_start + 1, bob_start + 2, bob_start + 3]


class FakeEvents:
    """An engine whose store events are given."""

    def __init__(self, namespaces: list[str]) -> None:
        self.all = [{"seq": i + 1, "kind": "published", "key": f"k{i}", "namespace": ns, "num_tokens": 16,
                     "tier": None} for i, ns in enumerate(namespaces)]

    def cache_events(self, since: int = 0) -> list[dict[str, object]]:
        return [e for e in self.all if int(e["seq"]) > since]  # type: ignore[call-overload]


def test_tenant_events_renumber_per_tenant_and_drop_foreign_namespaces() -> None:
    from sparsex.server.placement import TenantEvents

    llm = FakeEvents(["alice/", "bob/kb", "alice/kb", "\x00engine", "bob/", "alice/"])
    events = TenantEvents(keyed=True)
    events.pull(llm)  # type: ignore[arg-type]
    events.pull(llm)  # type: ignore[arg-type]  # nothing new: nothing twice
    assert [(e["seq"], e["namespace"], e["key"]) for e in events.since("alice", 0)] == \
        [(1, "", "k0"), (2, "kb", "k2"), (3, "", "k5")]
    assert [e["seq"] for e in events.since("bob", 0)] == [1, 2] and events.since("bob", 2) == []
    assert events.since("carol", 0) == []
    open_events = TenantEvents(keyed=False)
    open_events.pull(llm)  # type: ignore[arg-type]
    assert [e["seq"] for e in open_events.since(None, 3)] == [4, 5, 6]  # no keys: one tenant, as given
    small = TenantEvents(keyed=True, max_events=2)
    small.pull(llm)  # type: ignore[arg-type]
    assert [e["seq"] for e in small.since("alice", 0)] == [2, 3]  # the oldest fall off
