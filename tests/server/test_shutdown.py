"""SIGTERM with requests in flight: the real server, as a subprocess on a free loopback port.

Admission stops (503 JSON), a short request finishes within the grace period, long ones end with an
OpenAI-style error (a JSON body; an SSE error event then ``[DONE]``), and the process exits 0 with
no traceback in its log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.server.helpers import httpx, sse_events, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 2.5
LONG = {"prompt": "Keep going", "max_tokens": 8_000, "ignore_eos": True, "temperature": 0}


def long_context_copy(model_dir: Path, folder: Path) -> Path:
    """The tiny model with a 32k context, so that a long request cannot finish within the grace period
    however fast the machine is (RoPE extends; the weights stay random)."""
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 32_768
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except Exception as e:  # reported by the test's assertions
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_drains_then_exits_cleanly(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    model = long_context_copy(model_dir, tmp_path / "model")
    cmd = [sys.executable, "-m", "sparsex.server", "--model", str(model), "--port", str(port),
           "--kv-cache-memory", "256M", "--shutdown-grace", str(GRACE_S), "--log-level", "info"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            def healthy() -> bool:
                assert proc.poll() is None, log_path.read_text()
                try:
                    return http.get("/health").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(healthy, timeout=120, what="the server to start")

            def stream(body: dict[str, Any], started: threading.Event) -> list[Any]:
                with httpx.Client(base_url=url, timeout=120) as c, \
                        c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    events = []
                    for line in r.iter_lines():
                        events += sse_events([line])
                        started.set()
                    return events

            def post(body: dict[str, Any]) -> Any:
                with httpx.Client(base_url=url, timeout=120) as c:
                    return c.post("/v1/completions", json=body)

            long_started, short_started = threading.Event(), threading.Event()
            streaming, streamed = in_thread(lambda: stream(LONG, long_started))
            waiting, waited = in_thread(lambda: post(LONG))
            wait_until(lambda: http.get("/health").json()["requests_inflight"] >= 2, what="two long requests")
            assert long_started.wait(60)
            short_body = {"prompt": "Short", "max_tokens": 12, "ignore_eos": True, "temperature": 0}
            short, shorted = in_thread(lambda: stream(short_body, short_started))
            assert short_started.wait(60)  # in flight when the signal comes
            proc.send_signal(signal.SIGTERM)

            wait_until(lambda: http.get("/health").status_code == 503, timeout=10, what="draining")
            assert http.get("/health").headers["retry-after"] == "1"
            r = http.post("/v1/completions", json={"prompt": "late", "max_tokens": 1})
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            assert r.headers["retry-after"] == "1"

            for t in (short, waiting, streaming):
                t.join(60)
            short_events = shorted["result"]  # finished within the grace period
            assert short_events[-1] == "[DONE]" and short_events[-2]["choices"][0]["finish_reason"] == "length"
            err = waited["result"]
            assert err.status_code == 503 and err.json()["error"]["code"] == "aborted", err.text[-500:]
            assert err.headers["retry-after"] == "1"
            events = streamed["result"]
            assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "aborted"
            assert all("choices" in e for e in events[:-2])  # whole chunks before the error, none cut

        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = log_path.read_text()
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert "grace period over" in log
