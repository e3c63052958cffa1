"""``sparsex bench store`` on the tiny model: every source row is produced, and the store rows reuse
what the pool row reuses (times are printed, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.kvstore.conftest import RedisServer


def test_bench_store_rows(tiny_model_dir: Any, tmp_path: Path, redis_server: RedisServer) -> None:
    from sparsex.lab.bench.store import main

    out = tmp_path / "store.json"
    assert main(["--model", str(tiny_model_dir("llama")), "--docs", "2", "--doc-tokens", "40", "--redis",
                 redis_server.url, "--storage", "float32", "--kv-cache-memory", str(16 << 20),
                 "--out", str(out)]) == 0
    rows = {r["source"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["recompute", "redis", "disk", "pool"]
    assert rows["recompute"]["hit_tokens"] == 0
    assert rows["redis"]["hit_tokens"] == rows["disk"]["hit_tokens"] == rows["pool"]["hit_tokens"] == 80
    assert rows["redis"]["promoted"] == rows["disk"]["promoted"] == 2 and rows["redis"]["bytes"] > 0
    assert rows["redis"]["same_as_pool"] and rows["disk"]["same_as_pool"]  # fp32: the same KV as the pool's
