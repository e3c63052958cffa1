"""Server-sent event streams: same text as without streaming, usage chunk, stop strings, n > 1."""

from __future__ import annotations

from typing import Any

import openai

from tests.server.helpers import sse_events
from tests.server.test_completions import MESSAGES, pick_stop


def test_chat_stream_matches_non_stream(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = dict(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_stream_include_usage(client: openai.OpenAI, model: str) -> None:
    chunks = list(client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=5, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 5
    assert last.usage.model_dump()["recomputed_tokens"] <= last.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_with_stop_and_logprobs(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = dict(model=model, prompt="Generators", max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    stop = pick_stop(full)
    expected = full[: full.find(stop)]
    chunks = list(client.completions.create(**kwargs, stop=stop, stream=True, logprobs=0))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens or []]
    assert tokens  # every generated token reported once, even those inside the held-back text


def test_stream_n_choices(client: openai.OpenAI, model: str) -> None:
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                                 n=2, stream=True))
    texts = {0: "", 1: ""}
    finished = set()
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1}
    assert texts[0] == texts[1]


def test_raw_sse_format(http: Any, model: str) -> None:
    body = {"model": model, "prompt": "Sets", "max_tokens": 3, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert all(isinstance(e, dict) and e["object"] == "text_completion" for e in events[:-1])
