"""Parity with transformers on the real SmolLM2-135M and Gemma 3 270M weights."""

from __future__ import annotations

import pytest
import torch

from sparsex import LLM, SamplingParams
from sparsex.models.loader import resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["smollm2", "gemma3-270m"])
def pair(request: pytest.FixtureRequest):
    from transformers import AutoModelForCausalLM

    llm = LLM(model=request.param, kv_cache_memory=256 << 20)
    ref = AutoModelForCausalLM.from_pretrained(str(resolve_model(request.param)), dtype=torch.float32).eval()
    return llm, ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_logits_match_transformers(pair) -> None:
    llm, ref = pair
    gen = torch.Generator().manual_seed(0)
    # 600 tokens span 38 blocks and exceed Gemma 3's 512-token sliding window.
    for n in (5, 100, 600):
        ids = torch.randint(10, 20000, (n,), generator=gen)
        got = torch.from_numpy(llm.next_token_logprobs(ids.tolist()))
        with torch.no_grad():
            want = torch.log_softmax(ref(ids[None]).logits[0, -1], dim=-1)
        assert rel_err(got, want) <= 1e-4, (n, rel_err(got, want))


def test_greedy_32_tokens_identical(pair) -> None:
    llm, ref = pair
    ids = llm.tokenizer.encode_prompt("The history of the printing press begins")[0]
    out = llm.generate(ids, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))[0]
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert out.token_ids == want[0, len(ids):].tolist()
