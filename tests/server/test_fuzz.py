"""Property-based fuzzing of every endpoint (hypothesis), bounded in examples and time.

Bodies mix the fields the API knows with arbitrary JSON values of any type and depth (huge numbers,
NaN, lone surrogates, wrong types, unknown roles, nested junk). For every request: no 5xx, every
error is OpenAI-style JSON, every success is JSON (or a well-formed SSE stream). Meanwhile a client
keeps sending one well-formed greedy request, which must keep getting the same answer; ``/health``
stays ok.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsex.server.app import create_app
from sparsex.server.background import BackgroundServer
from tests.server.helpers import httpx, make_llm

# ----- strategies --------------------------------------------------------------------------------

TEXT = st.text(max_size=24) | st.sampled_from(["<|im_start|>", "\ud800", "a\x00b", "%2F", "../", "😀" * 3])
SCALAR = (st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
          | st.floats(allow_nan=True, allow_infinity=True) | TEXT)
JUNK = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)
SMALL_COUNT = st.integers(min_value=-2, max_value=3) | st.sampled_from([129, 1 << 40, "2", 2.0, True])
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "admin", ""]) | JUNK,
     "content": TEXT | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                       "text": TEXT}), max_size=3) | JUNK},
)
FIELDS: dict[str, Any] = {
    "model": st.sampled_from(["tiny", "nope"]) | JUNK,
    "max_tokens": SMALL_COUNT,
    "max_completion_tokens": SMALL_COUNT,
    "n": SMALL_COUNT,
    "temperature": st.sampled_from([0, 0.01, 0.7, 1e-300, 5e-324, -1, 2.5]) | JUNK,
    "top_p": st.sampled_from([1e-300, 0.5, 1, 0, 1.5]) | JUNK,
    "top_k": st.integers(min_value=-1, max_value=1 << 40) | JUNK,
    "stop": TEXT | st.lists(TEXT, max_size=20) | JUNK,
    "stop_token_ids": st.lists(st.integers(min_value=-5, max_value=1 << 40), max_size=4) | JUNK,
    "seed": st.integers(min_value=-(1 << 66), max_value=1 << 66) | JUNK,
    "stream": st.booleans() | JUNK,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | JUNK}) | JUNK,
    "logprobs": st.booleans() | st.integers(min_value=-1, max_value=7) | JUNK,
    "top_logprobs": st.integers(min_value=-1, max_value=30) | JUNK,
    "ignore_eos": st.booleans() | JUNK,
    "cache_salt": TEXT | JUNK,
    "user": TEXT | JUNK,
    "sparsex": st.fixed_dictionaries({}, optional={"reuse": st.sampled_from(["none", "prefix", "blend", "oracle",
                                                                              "magic"]) | JUNK,
                                                   "namespace": TEXT | JUNK,
                                                   "budget": st.floats(-1, 2) | JUNK}) | JUNK,
    "prompt": TEXT | st.lists(st.integers(min_value=-3, max_value=500), max_size=8) | st.lists(TEXT, max_size=3)
    | JUNK,
    "messages": st.lists(MESSAGE, max_size=3) | JUNK,
    "documents": st.lists(TEXT | st.fixed_dictionaries({"text": TEXT, "name": TEXT | JUNK}), max_size=3) | JUNK,
    "namespace": TEXT | JUNK,
}
BODY = st.dictionaries(st.sampled_from(sorted(FIELDS)), st.just(None), max_size=8).flatmap(
    lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys})
) | st.dictionaries(TEXT, JUNK, max_size=3)
RAW = st.sampled_from([b"", b"{", b"[" * 50_000, b"null", b'"x"', b"\xff\xfe", b'{"prompt": NaN}', b"{}" * 3])
POST = st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/segments"]),
                 BODY.map(lambda b: json.dumps(b).encode()) | RAW)
PATH_PART = st.text(alphabet=st.characters(codec="utf-8"), max_size=12).map(lambda s: quote(s, safe="/%"))
CALL = (
    POST.map(lambda pb: ("POST", pb[0], pb[1]))
    | PATH_PART.map(lambda s: ("DELETE", "/v1/segments/" + s, b""))
    | PATH_PART.map(lambda s: ("GET", "/v1/models/" + s, b""))
    | st.sampled_from([("GET", p, b"") for p in ("/v1/models", "/v1/segments", "/health", "/metrics",
                                                  "/v1/segments?namespace=%ED%A0%80", "/nope", "/v1/cache/entries",
                                                  "/v1/cache/entries?namespace=%00", "/v1/cache/events")])
    | st.one_of(st.integers(), TEXT).map(lambda v: ("GET", f"/v1/cache/events?since={quote(str(v).encode('utf-8', 'surrogatepass'))}", b""))
)

# ----- the test ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(model_dir: Path) -> Iterator[BackgroundServer]:
    app = create_app(make_llm(model_dir), max_queue=64, default_max_tokens=2)
    with BackgroundServer(app) as srv:
        yield srv


class Bystander:
    """Sends one greedy request over and over; every answer must equal the first."""

    BODY = {"prompt": "A bystander asks the same thing", "max_tokens": 3, "temperature": 0, "ignore_eos": True}

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.answers: list[Any] = []
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self.stop.is_set() and len(self.answers) < 500:
                r = http.post("/v1/completions", json=self.BODY)
                self.answers.append((r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))


def check_response(r: Any, method: str, path: str) -> None:
    assert r.status_code < 500, (method, path, r.status_code, r.text)
    ctype = r.headers.get("content-type", "")
    if ctype.startswith("text/event-stream"):
        lines = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert lines and lines[-1] == "data: [DONE]", r.text[-300:]
        for ln in lines[:-1]:
            json.loads(ln[len("data: "):])
    elif path != "/metrics" or r.status_code != 200:
        body = r.json()
        if r.status_code >= 400:
            assert set(body["error"]) == {"message", "type", "param", "code"}, body


def test_fuzz_every_endpoint(fuzz_server: BackgroundServer) -> None:
    bystander = Bystander(fuzz_server.url)
    bystander.thread.start()
    http = httpx.Client(base_url=fuzz_server.url, timeout=60)

    @settings(max_examples=250, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(CALL)
    def one_call(call: tuple[str, str, bytes]) -> None:
        method, path, body = call
        headers = {"content-type": "application/json"} if method == "POST" else {}
        check_response(http.request(method, path, content=body or None, headers=headers), method, path)

    try:
        one_call()
        assert http.get("/health").json()["status"] == "ok"
    finally:
        bystander.stop.set()
        bystander.thread.join(60)
        http.close()
    assert bystander.answers, "the bystander never got an answer"
    assert all(a == bystander.answers[0] for a in bystander.answers), bystander.answers
    assert bystander.answers[0][0] == 200
