"""Many clients at once: same greedy outputs as one at a time; disconnects free KV blocks at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from sparsex.server.background import BackgroundServer
from tests.server.helpers import httpx, wait_until

NUM_CLIENTS = 16


def questions() -> list[list[dict[str, str]]]:
    topics = ["loops", "classes", "modules", "imports", "exceptions", "lambdas", "decorators", "generators"]
    return [
        [{"role": "system", "content": f"Agent {i % 3}."}, {"role": "user", "content": f"Explain {t}, part {i}."}]
        for i, t in enumerate(topics * 2)
    ]


def test_sixteen_concurrent_clients_match_sequential(client: openai.OpenAI, model: str, server: Any) -> None:
    prompts = questions()
    assert len(prompts) == NUM_CLIENTS

    def ask(messages: list[dict[str, str]]) -> tuple[str, int]:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)  # type: ignore[arg-type]
        return str(r.choices[0].message.content), r.usage.completion_tokens  # type: ignore[union-attr]

    sequential = [ask(m) for m in prompts]
    with ThreadPoolExecutor(NUM_CLIENTS) as pool:
        concurrent = list(pool.map(ask, prompts))
    assert concurrent == sequential


def test_concurrent_streams_and_plain_requests(client: openai.OpenAI, model: str) -> None:
    def stream(i: int) -> str:
        chunks = client.completions.create(model=model, prompt=f"Topic {i}:", max_tokens=10, temperature=0,
                                           stream=True)
        return "".join(c.choices[0].text for c in chunks)

    def plain(i: int) -> str:
        r = client.completions.create(model=model, prompt=f"Topic {i}:", max_tokens=10, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        streamed = list(pool.map(stream, range(8)))
        plained = list(pool.map(plain, range(8)))
    assert streamed == plained


def server_engine(server: BackgroundServer) -> Any:
    return server.app.state.engine


def long_body(model: str, stream: bool) -> dict[str, Any]:
    # Hundreds of tokens: were it not aborted, it would still be running when the blocks are checked.
    return {"model": model, "prompt": "Tell me everything.", "max_tokens": 900, "temperature": 0,
            "ignore_eos": True, "stream": stream}


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_blocks(server: BackgroundServer, llm: Any, model: str, stream: bool) -> None:
    engine = server_engine(server)
    wait_until(lambda: engine.num_inflight == 0, what="an idle engine")
    free = llm.engine.pool.num_free_blocks
    aborted = engine.num_aborted
    if stream:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=long_body(model, True)) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break  # first chunk: hang up
    else:
        with httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, read=0.5)) as http:
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json=long_body(model, False))
    wait_until(lambda: engine.num_aborted == aborted + 1, what="the request to be aborted")
    wait_until(lambda: llm.engine.pool.num_free_blocks == free and engine.num_inflight == 0, what="blocks to be freed")
