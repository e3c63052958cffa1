"""Our forward pass against transformers' own, for every supported architecture."""

from __future__ import annotations

import pytest
import torch

from sparsex import LLM, SamplingParams
from sparsex.kv.paged import KVCache
from sparsex.models.loader import load_model
from sparsex.runtime.model_runner import ModelRunner, SeqInput
from tests.tiny_models import ARCHS

LENGTHS = (1, 7, 40, 100)  # 100 tokens span 7 blocks of 16 and exceed the tiny Gemma's window (24)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch: str, tiny_model_dir, device: str) -> None:
    folder = tiny_model_dir(arch)
    dev = torch.device(device)
    ours, cfg = load_model(folder, dev)
    ref = hf_model(folder)
    kv = KVCache(ours.spec, num_blocks=16, block_size=16, dtype=torch.float32, device=dev)
    runner = ModelRunner(ours, kv, dev)
    gen = torch.Generator().manual_seed(1)
    for n in LENGTHS:
        ids = torch.randint(4, cfg.vocab_size, (n,), generator=gen)
        table = list(range(15, 15 - (-(-n // 16)), -1))  # non-consecutive blocks: the gather path
        got = runner.forward([SeqInput(ids.tolist(), list(range(n)), table, n)], all_logits=True).cpu()
        with torch.no_grad():
            want = ref(ids[None]).logits[0]
        assert rel_err(got, want) <= 1e-4, (arch, n, rel_err(got, want))


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_transformers(arch: str, tiny_model_dir, device: str) -> None:
    folder = tiny_model_dir(arch)
    llm = LLM(model=str(folder), kv_cache_memory=8 << 20, device=device)
    ref = hf_model(folder)
    prompt = list(range(10, 50))
    out = llm.generate(prompt, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))[0]
    with torch.no_grad():
        want = ref.generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )[0, len(prompt):]
    assert out.token_ids == want.tolist()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_decode_after_prefill_equals_one_forward(arch: str, tiny_model_dir) -> None:
    """Decoding token by token over paged KV gives the logits of one full forward."""
    folder = tiny_model_dir(arch)
    ours, cfg = load_model(folder, torch.device("cpu"))
    kv = KVCache(ours.spec, num_blocks=16, block_size=16, dtype=torch.float32, device=torch.device("cpu"))
    runner = ModelRunner(ours, kv, torch.device("cpu"))
    ids = torch.randint(4, cfg.vocab_size, (60,), generator=torch.Generator().manual_seed(3)).tolist()
    table = [3, 9, 4, 12]
    full = runner.forward([SeqInput(ids, list(range(60)), table, 60)], all_logits=True)
    runner.forward([SeqInput(ids[:30], list(range(30)), table, 30)])
    for p in range(30, 60):
        step = runner.forward([SeqInput([ids[p]], [p], table, p + 1)])
        assert rel_err(step[0], full[p]) <= 1e-4


def test_logprobs_stay_aligned_with_tokens_when_eos_ends_generation(tiny_model_dir) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), kv_cache_memory=8 << 20)
    prompt = list(range(10, 30))
    free = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    eos = free.token_ids[3]
    llm.engine.eos_token_ids = {eos}  # make the 4th greedy token end generation
    out = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, logprobs=True))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: free.token_ids.index(eos)]
    assert len(out.logprobs) == len(out.token_ids)
