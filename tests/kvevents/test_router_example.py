"""The router of ``examples/kv_router.py`` (the one docs/DEPLOYMENT.md shows) on two real replicas'
events: it sends a prompt where its prefix is, a pasted document where it sits at any offset, and a
tenant's document only when scored in that tenant's namespace."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sparsex import SamplingParams, Segment
from sparsex.kvevents import KVEventsConfig
from tests.kvevents.subscriber import free_port
from tests.tiny_models import make_llm

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kv_router.py"
BS = 16
ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
QUESTION = [5, 6, 7, 8, 9, 11, 12]


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kv_router_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def doc(n_blocks: int, start: int) -> list[int]:
    return [10 + (start + i) % 300 for i in range(n_blocks * BS)]


@pytest.fixture
def cluster(tiny_model_dir: Any) -> Iterator[tuple[Any, Any, Any]]:
    endpoints = {name: (f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}") for name in "ab"}
    engines = {name: make_llm(tiny_model_dir("llama"), num_blocks=64, kv_events=KVEventsConfig(*eps, hash_seed="vllm-none-hash"))
               for name, eps in endpoints.items()}
    router = load_example().KVRouter(endpoints)
    yield engines["a"], engines["b"], router
    router.close()
    for llm in engines.values():
        llm.close()


def sync(router: Any, *engines: Any) -> None:
    for llm in engines:
        assert llm.kv_events.flush()
    for name in router.replicas:
        router.catch_up(name)
    while router.poll(100):
        pass


def test_the_router_picks_the_replica_holding_the_prompt(cluster: tuple[Any, Any, Any]) -> None:
    a, b, router = cluster
    doc_a, doc_b = doc(3, 0), doc(3, 100)
    a.generate([[Segment(doc_a), QUESTION]], ONE, reuse={"auto_segments": False})
    b.generate([[Segment(doc_b), QUESTION]], ONE, reuse={"auto_segments": False})
    sync(router, a, b)

    same_start = doc_a + [40, 41, 42]
    scores = router.score(same_start)
    assert scores["a"].prefix == 3 * BS and scores["b"].prefix == 0
    assert router.pick(same_start) == "a"

    pasted = [1, 2, 3, 4, 5] + doc_b + [40, 41, 42]  # doc_b at offset 5: no prefix anywhere
    scores = router.score(pasted)
    assert scores["b"].prefix == 0 and scores["b"].segment == 3 * BS and scores["a"].segment == 0
    assert router.pick(pasted) == "b"


def test_a_tenants_blocks_score_only_in_its_namespace(cluster: tuple[Any, Any, Any]) -> None:
    a, b, router = cluster
    private = doc(2, 200)
    a.generate([[Segment(private, "alice/"), QUESTION]], ONE, reuse={"auto_segments": False, "namespace": "alice/"})
    sync(router, a, b)
    prompt = [9, 9] + private + [40]
    assert router.score(prompt, "alice/")["a"].segment == 2 * BS
    assert router.pick(prompt, "alice/") == "a"
    assert router.score(prompt, "")["a"].segment == 0  # another namespace never scores it
