"""A real server (uvicorn on a loopback port, in a thread) over a tiny random Llama model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from sparsex import LLM
from sparsex.server.app import create_app
from sparsex.server.background import BackgroundServer
from tests.server.helpers import httpx, make_llm


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir: Any) -> Path:
    return Path(tiny_model_dir("llama"))


@pytest.fixture(scope="session")
def llm(model_dir: Path) -> LLM:
    """The engine behind the shared server (only its engine thread may call it)."""
    return make_llm(model_dir)


@pytest.fixture(scope="session")
def ref_llm(model_dir: Path) -> LLM:
    """A second engine on the same weights, driven directly, as the reference for greedy outputs."""
    return make_llm(model_dir)


@pytest.fixture(scope="session")
def server(llm: LLM) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(llm, max_queue=64, default_max_tokens=16)) as srv:
        yield srv


@pytest.fixture(scope="session")
def model(llm: LLM) -> str:
    return llm.model_name


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=60)
    yield c
    c.close()


@pytest.fixture
def http(server: BackgroundServer) -> Iterator[Any]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c

