"""The engine loop on its own: submit, abort, queue limit, failures, shutdown."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from sparsex import SamplingParams
from sparsex.server.engine_loop import EngineLoop, EngineStoppedError, QueueFullError
from tests.server.helpers import make_llm


def long_request(llm: object) -> list[object]:
    params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
    return [llm.add_request("Go on and on.", params)]  # type: ignore[attr-defined]


def test_submit_stream_and_shutdown(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    free = llm.engine.pool.num_free_blocks
    engine = EngineLoop(llm, max_queue=4)

    async def scenario() -> str | None:
        sub = await engine.submit(long_request, 1)
        first = await sub.events.get()
        assert first.new_token_ids and first.finish_reason is None
        await asyncio.to_thread(engine.stop)
        last = first
        while last.finish_reason is None:
            last = await asyncio.wait_for(sub.events.get(), 10)
        with pytest.raises(EngineStoppedError):
            await engine.submit(long_request, 1)
        return last.finish_reason

    assert asyncio.run(scenario()) == "abort"
    assert not engine.is_alive
    assert llm.engine.pool.num_free_blocks == free
    assert engine.num_inflight == 0 and engine.num_aborted == 1


def test_abort_and_failures_release_slots(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    free = llm.engine.pool.num_free_blocks
    engine = EngineLoop(llm, max_queue=2)

    def bad(_: object) -> list[object]:
        raise ValueError("bad prompt")

    async def scenario() -> None:
        with pytest.raises(QueueFullError):
            await engine.submit(long_request, 3)
        with pytest.raises(ValueError, match="bad prompt"):
            await engine.submit(bad, 1)
        assert engine.num_inflight == 0
        sub = await engine.submit(long_request, 1)
        await sub.events.get()
        engine.abort(sub)
        ev = await asyncio.wait_for(sub.events.get(), 10)
        while ev.finish_reason is None:
            ev = await asyncio.wait_for(sub.events.get(), 10)
        assert ev.finish_reason == "abort" and ev.metrics is not None
        assert await engine.call(lambda llm: llm.engine.pool.num_free_blocks) == free
        with pytest.raises(KeyError):
            await engine.call(lambda llm: {}["missing"])  # errors reach the caller, the loop lives on
        assert engine.num_inflight == 0 and engine.is_alive

    try:
        asyncio.run(scenario())
    finally:
        engine.stop()


def test_requests_stepped_inside_a_command_are_reported(model_dir: Path) -> None:
    """A command that steps the engine itself (as pinning does) must not leave a handler waiting."""
    llm = make_llm(model_dir)
    engine = EngineLoop(llm, max_queue=4)

    def add_and_drive(llm: object) -> list[object]:
        req = llm.add_request("Short one.", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))  # type: ignore[attr-defined]
        while not req.finished:
            llm.step()  # type: ignore[attr-defined]
        return [req]

    async def scenario() -> str | None:
        sub = await engine.submit(add_and_drive, 1)
        ev = await asyncio.wait_for(sub.events.get(), 10)
        return ev.finish_reason

    try:
        assert asyncio.run(scenario()) == "length"
        assert engine.num_inflight == 0
    finally:
        engine.stop()


def test_a_request_that_cannot_be_reported_fails_alone(model_dir: Path) -> None:
    """Detokenizing one request's tokens raises: that request ends with ``error``, the other goes on."""
    llm = make_llm(model_dir)
    engine = EngineLoop(llm, max_queue=4)
    decode = llm.tokenizer.decode

    def failing_decode(ids: list[int]) -> str:
        caller = sys._getframe(1)
        while caller.f_code.co_name.startswith("<"):  # the comprehension's frame, on some Pythons
            caller = caller.f_back  # type: ignore[assignment]
        if caller.f_code.co_name == "_emit":  # the loop's per-token texts, asked for by logprobs only
            raise RuntimeError("cannot decode")
        return str(decode(ids))

    llm.tokenizer.decode = failing_decode  # type: ignore[method-assign]

    def add(seed: int, logprobs: bool) -> Any:
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, seed=seed, logprobs=logprobs)
        return lambda llm: [llm.add_request("Either one.", params)]

    async def last(sub: Any) -> str | None:
        ev = await asyncio.wait_for(sub.events.get(), 10)
        while ev.finish_reason is None:
            ev = await asyncio.wait_for(sub.events.get(), 10)
        return ev.finish_reason

    async def scenario() -> tuple[str | None, str | None]:
        bad = await engine.submit(add(13, True), 1)
        good = await engine.submit(add(1, False), 1)
        return await last(bad), await last(good)

    try:
        assert asyncio.run(scenario()) == ("error", "length")
        assert engine.is_alive and engine.num_inflight == 0
    finally:
        engine.stop()


def test_one_tenant_cannot_fill_the_queue_for_the_others(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    engine = EngineLoop(llm, max_queue=4, max_queue_per_tenant=2)

    async def scenario() -> None:
        a = [await engine.submit(long_request, 1, tenant="a") for _ in range(2)]
        with pytest.raises(QueueFullError, match="tenant"):
            await engine.submit(long_request, 1, tenant="a")
        b = [await engine.submit(long_request, 1, tenant="b") for _ in range(2)]  # the rest is still there
        with pytest.raises(QueueFullError):
            await engine.submit(long_request, 1, tenant="c")  # max_queue still holds overall
        engine.abort(a[0])
        while (await asyncio.wait_for(a[0].events.get(), 10)).finish_reason is None:
            pass
        again = await engine.submit(long_request, 1, tenant="a")  # a's finished request freed its share
        for sub in (a[1], *b, again):
            engine.abort(sub)
        assert await engine.call(lambda llm: True)

    try:
        asyncio.run(scenario())
    finally:
        engine.stop()
    assert engine.num_inflight == 0
