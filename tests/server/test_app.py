"""Health, models, metrics, the queue limit and shutdown."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai

from sparsex.server.app import create_app
from sparsex.server.background import BackgroundServer
from tests.server.helpers import httpx, make_llm, sse_events, wait_until
from tests.server.test_errors import assert_error


def test_health_and_models(http: Any, client: openai.OpenAI, model: str, llm: Any) -> None:
    assert http.get("/health").json()["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == [model]
    assert models.data[0].model_dump()["max_model_len"] == llm.spec.max_position
    assert client.models.retrieve(model).id == model


def metric(text: str, name: str, required: bool = True) -> float:
    """The sum of a metric's samples (over labels); a labelled counter with no samples yet reads 0."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found or not required, f"{name} missing from /metrics"
    return total


def test_metrics(http: Any, client: openai.OpenAI, model: str) -> None:
    before = http.get("/metrics").text
    client.completions.create(model=model, prompt="Count me", max_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text
    assert metric(after, "sparsex_requests_total") == metric(before, "sparsex_requests_total", False) + 1
    assert metric(after, "sparsex_generation_tokens_total") == metric(before, "sparsex_generation_tokens_total") + 4
    assert metric(after, "sparsex_prompt_tokens_total") > metric(before, "sparsex_prompt_tokens_total")
    assert metric(after, "sparsex_time_to_first_token_seconds_count") >= 1
    assert metric(after, "sparsex_e2e_request_latency_seconds_count") >= 1
    for name in ("sparsex_prefix_hit_tokens_total", "sparsex_segment_hit_tokens_total",
                 "sparsex_recomputed_tokens_total", "sparsex_recompute_fraction_count", "sparsex_kv_cache_usage",
                 "sparsex_kv_blocks_free", "sparsex_requests_inflight", "sparsex_http_requests_total"):
        metric(after, name)
    assert 0.0 <= metric(after, "sparsex_kv_cache_usage") <= 1.0


def test_queue_limit_and_shutdown(model_dir: Path) -> None:
    app = create_app(make_llm(model_dir), max_queue=2)
    engine = app.state.engine
    gate = threading.Event()
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        body = {"prompt": "Queue", "max_tokens": 2, "temperature": 0}
        assert_error(http.post("/v1/completions", json={**body, "n": 3}), 429, code="queue_full")

        # Hold the engine thread so that two admitted requests stay in flight.
        blocker = threading.Thread(target=lambda: __import__("asyncio").run(engine.call(lambda _: gate.wait(30))))
        blocker.start()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(http.post, "/v1/completions", json={**body, "n": 2})
            wait_until(lambda: engine.num_inflight == 2, what="two requests in flight")
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            assert_error(r, 429, code="queue_full")
            gate.set()
            assert pending.result().status_code == 200
        blocker.join(30)
        assert "sparsex_requests_rejected_total 2" in http.get("/metrics").text
    assert not engine.is_alive  # lifespan exit stopped the engine thread


class FailingLLM:
    """A real engine whose ``step`` raises while ``fail`` is set."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self.fail = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def step(self) -> Any:
        if self.fail:
            raise RuntimeError("simulated engine fault /secret/path.py line 3")
        return self._llm.step()


def test_engine_failure_is_a_500_without_details(model_dir: Path) -> None:
    llm = FailingLLM(make_llm(model_dir))
    free = llm.pool.num_free_blocks
    with BackgroundServer(create_app(llm)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:  # type: ignore[arg-type]
        body = {"prompt": "Fail", "max_tokens": 3}
        err = assert_error(http.post("/v1/completions", json=body), 500, code="engine_error")
        assert "secret" not in err["message"]
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = sse_events(r.iter_lines())
        assert "error" in events[0] and events[-1] == "[DONE]"
        llm.fail = False
        assert http.post("/v1/completions", json=body).status_code == 200  # the loop lives on
        assert http.get("/health").json()["status"] == "ok"
    assert llm.pool.num_free_blocks == free
