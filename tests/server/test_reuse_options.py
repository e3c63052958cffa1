"""The ``sparsex`` extension object and ``cache_salt`` reach the engine as per-request reuse options."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from sparsex import LLM
from sparsex.server.app import create_app
from sparsex.server.background import BackgroundServer
from tests.server.helpers import make_llm


class RecordingLLM:
    """A real engine whose ``add_choices`` records the spans, reuse options and sampling parameters of
    every choice it was given (the server adds a prompt's ``n`` choices in one call)."""

    def __init__(self, llm: LLM) -> None:
        self._llm = llm
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def add_choices(self, ids: list[int], params: Any, spans: Any = (), request_ids: Any = None,
                    reuse: Any = None, tenant: str = "default") -> Any:
        self.calls += [{"spans": list(spans), "reuse": reuse, "params": p, "tenant": tenant} for p in params]
        return self._llm.add_choices(ids, params, spans, request_ids, reuse, tenant)


@pytest.fixture
def recorded(model_dir: Path) -> Iterator[tuple[RecordingLLM, openai.OpenAI]]:
    llm = RecordingLLM(make_llm(model_dir))
    with BackgroundServer(create_app(llm)) as srv:  # type: ignore[arg-type]
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=60)
        yield llm, client
        client.close()


def test_options_are_forwarded(recorded: tuple[RecordingLLM, openai.OpenAI]) -> None:
    llm, client = recorded
    model = llm.model_name
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there."}]

    client.chat.completions.create(model=model, messages=messages, max_tokens=2,  # type: ignore[arg-type]
                                   extra_body={"sparsex": {"reuse": "prefix", "namespace": "t1", "budget": 0.2}})
    call = llm.calls[-1]
    assert call["reuse"] == {"method": "prefix", "budget": 0.2, "namespace": "t1"}
    assert call["spans"] and all(s.namespace == "t1" and s.source == "chat" for s in call["spans"])

    client.chat.completions.create(model=model, messages=messages, max_tokens=2,  # type: ignore[arg-type]
                                   extra_body={"cache_salt": "tenant-b"})
    assert llm.calls[-1]["reuse"] == {"namespace": "tenant-b"}
    assert all(s.namespace == "tenant-b" for s in llm.calls[-1]["spans"])

    client.completions.create(model=model, prompt="plain", max_tokens=2)
    assert llm.calls[-1]["reuse"] == {"namespace": ""}  # nothing asked: the engine's defaults
    assert {c["tenant"] for c in llm.calls} == {"default"}  # no API keys: one tenant


def test_n_choices_get_distinct_seeds(recorded: tuple[RecordingLLM, openai.OpenAI]) -> None:
    llm, client = recorded
    client.completions.create(model=llm.model_name, prompt="seeded", max_tokens=2, n=3, seed=41)
    assert [c["params"].seed for c in llm.calls[-3:]] == [41, 42, 43]


def test_the_tenant_of_the_key_reaches_the_scheduler(model_dir: Path) -> None:
    from sparsex.server.auth import Tenants

    llm = RecordingLLM(make_llm(model_dir))
    app = create_app(llm, tenants=Tenants.from_keys({"key-a": "alice", "key-b": "bob"}))  # type: ignore[arg-type]
    with BackgroundServer(app) as srv:
        for key in ("key-a", "key-b"):
            c = openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=60)
            c.completions.create(model=llm.model_name, prompt="plain", max_tokens=1, n=2)
            c.close()
    assert [c["tenant"] for c in llm.calls] == ["alice", "alice", "bob", "bob"]
