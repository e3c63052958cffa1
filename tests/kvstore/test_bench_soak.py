"""``sparsex bench serve --soak`` on the tiny model over a real redis-server: every request is
answered and sampled sizes come back before, during and after (sizes are reported, never judged)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis

from tests.kvstore.conftest import RedisServer


def test_soak_samples_memory_pool_disk_and_redis(tiny_model_dir: Any, tmp_path: Path,
                                                 redis_server: RedisServer) -> None:
    from sparsex.cli import main

    out = tmp_path / "soak.json"
    rc = main(["bench", "serve", "--soak", "--model", str(tiny_model_dir("llama")), "--requests", "24",
               "--concurrency", "2", "--samples", "3", "--doc-chars", "200", "--fresh-words", "30",
               "--kv-store", redis_server.url, "--kv-disk", str(tmp_path / "disk"), "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["summary"]["statuses"] == {"200": 24} and len(data["requests"]) == 24
    assert {r["tenant"] for r in data["requests"]} == {"a", "b"}
    phases = [s["phase"] for s in data["samples"]]
    assert phases[0] == "before" and phases[-2:] == ["after", "after gc"] and phases.count("during") == 2
    before, after = data["samples"][0], data["samples"][-1]
    assert after["requests_done"] == 24 and after["rss_bytes"] > 0
    assert after["disk_files"] > before["disk_files"] and after["disk_bytes"] > 0  # fresh text was written
    assert after["redis_keys"] > 0 and after["redis_keys"] == redis.Redis.from_url(redis_server.url).dbsize()
    assert data["summary"]["ttft_s"]["n"] == 24 and data["summary"]["ttft_s"]["p99"] is None  # n < 100


def test_soak_starts_its_own_redis_server() -> None:
    from sparsex.lab.bench.soak import local_redis

    with local_redis("16mb") as url:
        assert url is not None
        client = redis.Redis.from_url(url)
        assert client.ping() and client.config_get("maxmemory")["maxmemory"] == str(16 << 20)
    try:
        client.ping()
    except redis.ConnectionError:
        pass
    else:
        raise AssertionError("the local redis-server outlived its context")
