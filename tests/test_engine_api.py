"""The engine's own API: streaming through the shared cursor, and one request's failure staying its own."""

from __future__ import annotations

from typing import Any

import pytest

from sparsex import LLM, SamplingParams
from sparsex.detokenize import REPLACEMENT_CHAR


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Any) -> LLM:
    return LLM(model=str(tiny_model_dir("llama")), kv_cache_memory=16 << 20)


def test_stream_yields_exactly_the_final_text(llm: LLM) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = llm.generate("Once upon a time", params)[0].text
    deltas = list(llm.stream(llm.add_request("Once upon a time", params)))
    assert "".join(deltas) == want
    assert all(d and not d.endswith(REPLACEMENT_CHAR) for d in deltas[:-1])


def test_a_failing_request_finishes_alone(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    import sparsex.core.engine as engine

    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    poisoned = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    good = llm.add_request("A healthy request", params)
    bad = llm.add_request("A poisoned request", poisoned)
    real = engine.sample

    def sample(logits: Any, p: SamplingParams, gen: Any, index: int = 0) -> tuple[int, float]:
        if p is poisoned and len(bad.output_token_ids) == 2:  # its third token, in a decode batch
            raise FloatingPointError("poisoned")
        return real(logits, p, gen, index)

    monkeypatch.setattr(engine, "sample", sample)
    while not (good.finished and bad.finished):
        llm.step()
    assert bad.finish_reason == "error" and len(bad.output_token_ids) == 2
    assert good.finish_reason == "length" and len(good.output_token_ids) == 6
    assert isinstance(llm.error_of(bad), FloatingPointError) and llm.error_of(bad) is None
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks - llm.engine.pool.num_pinned_blocks


def test_generate_raises_the_failure(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    import sparsex.core.engine as engine

    monkeypatch.setattr(engine, "sample", lambda *a: (_ for _ in ()).throw(FloatingPointError("boom")))
    with pytest.raises(FloatingPointError, match="boom"):
        llm.generate("Anything", SamplingParams(max_tokens=3))
    assert not llm.has_unfinished()


def test_engine_options_are_the_configs_fields_and_the_config_checks_itself() -> None:
    from typing import get_type_hints

    from sparsex.config import CONFIG_FIELDS, EngineConfig, EngineOptions

    assert set(get_type_hints(EngineOptions)) == set(CONFIG_FIELDS) - {"model"}
    for bad in ({"max_prefill_tokens": 0}, {"kv_dtype": "int8"}, {"block_size": 0}, {"high_water": 1.5},
                {"kv_store_dtype": "float64"}):
        with pytest.raises(ValueError):
            EngineConfig(**bad)  # type: ignore[arg-type]


def test_llm_takes_a_config_or_its_fields(tiny_model_dir: Any) -> None:
    from sparsex.config import EngineConfig

    folder = str(tiny_model_dir("llama"))
    a = LLM(config=EngineConfig(model=folder, kv_cache_memory=4 << 20, block_size=8))
    b = LLM(folder, kv_cache_memory=4 << 20, block_size=8)
    assert a.config == b.config and a.pool.block_size == 8
    with pytest.raises(ValueError, match="either config"):
        LLM(folder, config=EngineConfig(model=folder))
