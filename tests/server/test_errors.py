"""Bad input gets an OpenAI-style JSON error with the right status, never a 500 or a traceback."""

from __future__ import annotations

from typing import Any

import openai
import pytest


def assert_error(r: Any, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return dict(err)


def chat(model: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


def test_malformed_json(http: Any) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/segments"):
        r = http.post(path, content=b'{"model": ', headers={"content-type": "application/json"})
        assert_error(r, 400, code="invalid_json")
    assert_error(http.post("/v1/completions", json=[1, 2]), 400, code="invalid_json")


def test_unknown_model(http: Any, client: openai.OpenAI) -> None:
    assert_error(http.post("/v1/chat/completions", json=chat("gpt-17")), 404, param="model", code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert_error(http.get("/v1/models/nope"), 404)


def test_prompt_over_context(http: Any, client: openai.OpenAI, model: str, llm: Any) -> None:
    limit = llm.spec.max_position
    long_ids = [5] * (limit + 10)
    r = http.post("/v1/completions", json={"model": model, "prompt": long_ids, "max_tokens": 1})
    assert_error(r, 400, param="prompt", code="context_length_exceeded")
    r = http.post("/v1/completions", json={"model": model, "prompt": [5] * 10, "max_tokens": limit})
    assert_error(r, 400, code="context_length_exceeded")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 2000}])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": 9}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -3}, "max_completion_tokens"),
        ({"top_logprobs": 50}, "top_logprobs"),
        ({"stop": [""]}, "stop"),
        ({"sparsex": {"budget": 1.5}}, "sparsex.budget"),
        ({"sparsex": {"bogus": 1}}, "sparsex.bogus"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content"),
    ],
)
def test_out_of_range_parameters(http: Any, model: str, extra: dict[str, Any], param: str) -> None:
    assert_error(http.post("/v1/chat/completions", json=chat(model, **extra)), 400, param=param)


def test_bad_completion_prompts(http: Any, model: str, llm: Any) -> None:
    def post(prompt: Any) -> Any:
        return http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 1})

    assert_error(post(""), 400)
    assert_error(post([]), 400)
    assert_error(post([llm.spec.vocab_size + 5]), 400)
    assert_error(post([1, "a"]), 400)
    assert_error(post({"text": "x"}), 400)
    assert_error(http.post("/v1/completions", json={"model": model, "prompt": "x", "logprobs": 9}), 400,
                 param="logprobs")
    assert_error(http.post("/v1/completions", json={"model": model}), 400, param="prompt")


def test_unknown_reuse_method(http: Any, client: openai.OpenAI, model: str) -> None:
    r = http.post("/v1/chat/completions", json=chat(model, sparsex={"reuse": "magic"}))
    assert_error(r, 400, param="sparsex.reuse", code="invalid_reuse")
    # The evaluation-only oracle (a full prefill per request) is not served.
    r = http.post("/v1/chat/completions", json=chat(model, sparsex={"reuse": "oracle"}))
    assert_error(r, 400, param="sparsex.reuse", code="invalid_reuse")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="x", max_tokens=1, extra_body={"sparsex": {"reuse": "x"}})


def test_streaming_request_errors_before_the_stream(http: Any, model: str) -> None:
    r = http.post("/v1/chat/completions", json=chat(model, stream=True, temperature=-2))
    assert_error(r, 400, param="temperature")


def test_unknown_route_and_method(http: Any) -> None:
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/chat/completions"), 405)


def test_errors_leave_the_server_healthy(http: Any, client: openai.OpenAI, model: str) -> None:
    http.post("/v1/chat/completions", content=b"\xff\xfe", headers={"content-type": "application/json"})
    assert http.get("/health").json()["status"] == "ok"
    r = client.completions.create(model=model, prompt="still fine", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
