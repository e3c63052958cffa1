"""Every error a client can cause is a 4xx with an OpenAI-style body: digits that are not ASCII,
a body cut off by a disconnect, a body that is not declared JSON; 429 and 503 say when to retry."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sparsex.server.app import create_app
from sparsex.server.background import BackgroundServer
from tests.server.helpers import httpx, make_llm, wait_until
from tests.server.test_errors import assert_error

BODY = b'{"prompt": "Hi", "max_tokens": 1}'


@pytest.mark.parametrize("since", ["\u00b2", "\u00b3", "\u2460", "\uff11\uff12", "\u0663", "\u06f3", "1\u00b2", "-1",
                                   "1.0", " 1", "0x1", "1" * 19])
def test_since_takes_ascii_digits_only(http: Any, since: str) -> None:
    assert_error(http.get("/v1/cache/events", params={"since": since}), 400, param="since")


def test_since_in_ascii_digits_is_served(http: Any) -> None:
    r = http.get("/v1/cache/events", params={"since": "0012"})
    assert r.status_code == 200 and r.json()["last_seq"] == 12


@pytest.mark.parametrize("ctype", [None, "text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", "application/jsonx", "application/json-seq",
                                   "text/json"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/segments"])
def test_json_endpoints_take_only_json_bodies(http: Any, path: str, ctype: str | None) -> None:
    """A browser page can POST ``text/plain`` (or a typeless body) cross-site without a preflight."""
    headers = {} if ctype is None else {"content-type": ctype}
    r = http.post(path, content=BODY, headers=headers)
    assert_error(r, 415, param="content-type", code="unsupported_media_type")


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_json_with_parameters_or_any_case_is_json(http: Any, ctype: str) -> None:
    r = http.post("/v1/completions", content=BODY, headers={"content-type": ctype})
    assert r.status_code == 200, r.text


@pytest.fixture
def own_server(model_dir: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(make_llm(model_dir), default_max_tokens=2)) as srv:
        yield srv


def http_count(text: str, route: str, status: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("sparsex_http_requests_total{") and f'route="{route}"' in line and f'status="{status}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_client_that_disconnects_mid_body_is_a_client_error(own_server: BackgroundServer,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Declares 100 bytes, sends 10, closes: counted as a 400, no traceback, and the server goes on."""
    caplog.set_level(logging.INFO)
    for path in ("/v1/completions", "/v1/segments"):
        with socket.create_connection((own_server.host, own_server.port), timeout=30) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         "Content-Length: 100\r\n\r\n".encode() + b'{"prompt":')
        with httpx.Client(base_url=own_server.url, timeout=60) as http:
            wait_until(lambda p=path: http_count(http.get("/metrics").text, p, "400") == 1,  # type: ignore[misc]
                       what="the 400 counted")
            metrics = http.get("/metrics").text
            assert http_count(metrics, path, "500") == 0
            assert http.post("/v1/completions", json={"prompt": "still here", "max_tokens": 1}).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text and "unhandled" not in caplog.text
