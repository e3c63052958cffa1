"""``n`` choices of one prompt share one prefill on the server, and each keeps its own seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsex import SamplingParams
from sparsex.server.app import create_app
from sparsex.server.background import BackgroundServer
from tests.server.helpers import httpx, make_llm


def test_n_choices_prefill_once_and_match_separate_seeded_runs(model_dir: Path) -> None:
    llm, ref = make_llm(model_dir), make_llm(model_dir)
    starts: list[Any] = []
    real = llm.engine.prefiller.start
    llm.engine.prefiller.start = lambda *a: (starts.append(a), real(*a))[1]  # type: ignore[method-assign]
    prompt = "The history of the printing press " * 8
    body = {"model": llm.model_name, "prompt": prompt, "n": 4, "max_tokens": 6, "temperature": 0.9, "seed": 11}
    with BackgroundServer(create_app(llm, max_queue=16, default_max_tokens=8)) as srv:
        r = httpx.post(f"{srv.base_url}/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 4 and len(starts) == 1  # one prefill for the four choices
    for j, c in enumerate(choices):  # choice j samples with seed + j, as a separate request would
        params = SamplingParams(max_tokens=6, temperature=0.9, seed=11 + j)
        assert c["text"] == ref.generate(prompt, params)[0].text
