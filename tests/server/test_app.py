"""Health, models, metrics, the queue limit and shutdown."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
from prometheus_client.parser import text_string_to_metric_families

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


def samples(text: str) -> list[Any]:
    """Every sample of an exposition, parsed back by prometheus_client's own parser."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def metric(text: str, name: str, required: bool = True, **labels: str) -> float:
    """The sum of a sample's values over the label sets that match ``labels``."""
    found = [s for s in samples(text) if s.name == name and labels.items() <= s.labels.items()]
    assert found or not required, f"{name} {labels} missing from /metrics"
    return sum(s.value for s in found)


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
                 "sparsex_requests_inflight", "sparsex_http_requests_total", "sparsex_requests_aborted_total"):
        metric(after, name)
    assert metric(after, "sparsex_kv_blocks", state="free") <= metric(after, "sparsex_kv_blocks", state="total")
    assert 0.0 <= metric(after, "sparsex_kv_cache_usage") <= 1.0
    assert metric(after, "sparsex_http_requests_total", route="/v1/completions", method="POST", status="200") >= 1


def test_metrics_count_found_tokens_by_source_runs_and_seams(http: Any, client: openai.OpenAI, model: str) -> None:
    """A document seen inside one plain prompt and found again inside another: /metrics counts the
    tokens found in plain text (``source="auto"``), the runs, and the tokens lost at seams."""
    from pydoc_data.topics import topics

    docs = [topics[k][:300] for k in ("assert", "class", "calls")]
    before = http.get("/metrics").text
    client.completions.create(model=model, prompt="Read these.\n\n" + "\n\n".join(docs), max_tokens=1,
                              extra_body={"sparsex": {"reuse": "none"}})
    out = client.completions.create(model=model, prompt="Other order.\n" + "\n".join(docs[::-1]) + "\nWhy?",
                                    max_tokens=1, extra_body={"sparsex": {"reuse": "naive"}})
    after = http.get("/metrics").text
    found_auto = metric(after, "sparsex_found_tokens_total", source="auto") - metric(
        before, "sparsex_found_tokens_total", False, source="auto")
    assert found_auto == out.model_dump()["usage"]["segment_hit_tokens"] > 0  # plain text: all of it auto
    assert metric(after, "sparsex_reused_runs_total") - metric(before, "sparsex_reused_runs_total", False) >= 3
    assert metric(after, "sparsex_seam_lost_tokens_total") >= metric(before, "sparsex_seam_lost_tokens_total", False)
    sources = {s.labels["source"] for s in samples(after) if s.name == "sparsex_found_tokens_total"}
    assert sources <= {"prefix", "explicit", "chat", "auto", "pinned", "other"} and "prefix" in sources


def test_metrics_labels_are_route_templates(http: Any) -> None:
    """A hostile path can neither inject lines into the exposition nor grow it (issue 15, item 4)."""
    evil = "/v1/segments/x%22%2Cstatus%3D%22200%22%7D%201%0Afake_metric%201%0A"
    for i in range(50):
        assert_error(http.delete(evil), 404)
        assert_error(http.delete(f"/v1/segments/seg{i}%22%7D"), 404)
        http.get(f"/unknown/{i}")
    first = http.get("/metrics").text
    for i in range(50, 150):
        http.get(f"/unknown/{i}")
    text = http.get("/metrics").text
    names = {s.name for s in samples(text)}
    assert "fake_metric" not in names and all(n.startswith("sparsex_") for n in names)
    routes = {s.labels["route"] for s in samples(text) if s.name == "sparsex_http_requests_total"}
    assert "/v1/segments/{segment_id:path}" in routes and "unmatched" in routes
    assert all(not r.startswith("/unknown") for r in routes)
    assert len(text.splitlines()) == len(first.splitlines())  # more unknown paths, no new lines


def test_queue_limit_and_shutdown(model_dir: Path) -> None:
    app = create_app(make_llm(model_dir), max_queue=2)
    engine = app.state.engine
    gate = threading.Event()
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        body = {"prompt": "Queue", "max_tokens": 2, "temperature": 0}
        # More choices than the queue holds can never be admitted: 400, not a 429 to retry.
        assert_error(http.post("/v1/completions", json={**body, "n": 3}), 400, code="too_many_choices")

        # Hold the engine thread so that two admitted requests stay in flight.
        blocker = threading.Thread(target=lambda: __import__("asyncio").run(engine.call(lambda _: gate.wait(30))))
        blocker.start()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(http.post, "/v1/completions", json={**body, "n": 2})
            wait_until(lambda: engine.num_inflight == 2, what="two requests in flight")
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            assert_error(r, 429, code="queue_full")
            assert r.headers["retry-after"] == "1"
            gate.set()
            assert pending.result().status_code == 200
        blocker.join(30)
        assert metric(http.get("/metrics").text, "sparsex_requests_rejected_total") == 1
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
    free = llm.engine.pool.num_free_blocks
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
    assert llm.engine.pool.num_free_blocks == free
