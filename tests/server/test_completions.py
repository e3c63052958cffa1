"""Chat and text completions through the official openai client, checked against the engine itself."""

from __future__ import annotations

import openai

from sparsex import LLM, SamplingParams

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What does the if statement do?"},
]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def test_chat_greedy_matches_the_engine(client: openai.OpenAI, model: str, ref_llm: LLM) -> None:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    ref = ref_llm.chat(MESSAGES, GREEDY)
    assert r.object == "chat.completion"
    assert r.model == model
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_usage_has_the_cache_extension_fields(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    usage = r.usage.model_dump()  # type: ignore[union-attr]
    for key in ("prefix_hit_tokens", "segment_hit_tokens", "recomputed_tokens"):
        assert isinstance(usage[key], int) and usage[key] >= 0
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached == usage["prefix_hit_tokens"] + usage["segment_hit_tokens"]
    assert usage["recomputed_tokens"] <= usage["prompt_tokens"]


def test_content_parts_are_accepted(client: openai.OpenAI, model: str, ref_llm: LLM) -> None:
    parts = [{"type": "text", "text": "Document one. "}, {"type": "text", "text": "What is in it?"}]
    messages = [{"role": "user", "content": parts}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert r.choices[0].message.content == ref_llm.chat(messages, SamplingParams(max_tokens=8, temperature=0)).text


def test_completion_string_prompt(client: openai.OpenAI, model: str, ref_llm: LLM) -> None:
    r = client.completions.create(model=model, prompt="The for statement", max_tokens=10, temperature=0)
    ref = ref_llm.generate("The for statement", SamplingParams(max_tokens=10, temperature=0))[0]
    assert r.object == "text_completion"
    assert r.choices[0].text == ref.text
    assert r.usage is not None and r.usage.completion_tokens == len(ref.token_ids)


def test_completion_batch_of_prompts_and_token_ids(client: openai.OpenAI, model: str, ref_llm: LLM) -> None:
    prompts = ["Classes are", "A module is"]
    r = client.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0)
    refs = ref_llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [o.text for o in refs]
    assert r.usage is not None and r.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in refs)

    ids = refs[0].prompt_token_ids
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == refs[0].text


def test_n_choices(client: openai.OpenAI, model: str) -> None:
    greedy = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0, n=3)  # type: ignore[arg-type]
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    assert greedy.usage is not None
    single = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens  # type: ignore[union-attr]  # counted once

    sampled = client.completions.create(model=model, prompt="Exceptions", max_tokens=8, temperature=1.0, n=4,
                                        seed=3)
    assert len(sampled.choices) == 4
    assert len({c.text for c in sampled.choices}) > 1  # each choice gets its own seed


def test_seed_reproducibility(client: openai.OpenAI, model: str) -> None:
    def run(seed: int) -> str:
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=1.0,  # type: ignore[arg-type]
                                           seed=seed)
        return str(r.choices[0].message.content)

    assert run(1234) == run(1234)
    assert len({run(s) for s in (1, 2, 3)}) > 1


def pick_stop(text: str) -> str:
    """A two-character substring past the start, free of U+FFFD (split UTF-8 from the random model)."""
    for i in range(2, len(text) - 1):
        if "\ufffd" not in text[i : i + 2]:
            return text[i : i + 2]
    raise AssertionError(f"no stop string candidate in {text!r}")


def test_stop_string(client: openai.OpenAI, model: str, ref_llm: LLM) -> None:
    full = ref_llm.generate("Functions", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].text
    stop = pick_stop(full)
    r = client.completions.create(model=model, prompt="Functions", max_tokens=16, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_max_completion_tokens(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=3, temperature=0,  # type: ignore[arg-type]
                                       extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 3
    assert r.choices[0].finish_reason == "length"


def test_default_max_tokens(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt="Loops", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 16  # the server's default_max_tokens


def test_chat_logprobs(client: openai.OpenAI, model: str, ref_llm: LLM) -> None:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, temperature=0,  # type: ignore[arg-type]
                                       logprobs=True, top_logprobs=1)
    ref = ref_llm.chat(MESSAGES, SamplingParams(max_tokens=5, temperature=0, logprobs=True))
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == len(ref.token_ids)
    for entry, lp in zip(content, ref.logprobs, strict=False):
        assert abs(entry.logprob - lp) < 1e-4
        assert entry.top_logprobs[0].token == entry.token
    no_lp = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, temperature=0)  # type: ignore[arg-type]
    assert no_lp.choices[0].logprobs is None


def test_completion_logprobs(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt="Lambda", max_tokens=5, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == 5
    assert all(x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset is not None and lp.text_offset[0] == 0
    assert lp.top_logprobs is not None and len(lp.top_logprobs) == 5


def test_sparsex_options_and_cache_salt(client: openai.OpenAI, model: str, ref_llm: LLM) -> None:
    ref = ref_llm.chat(MESSAGES, SamplingParams(max_tokens=6, temperature=0)).text
    for reuse in ("none", "prefix"):
        r = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=6, temperature=0, user="tenant-a",  # type: ignore[arg-type]
            extra_body={"sparsex": {"reuse": reuse, "namespace": "tenant-a", "budget": 0.2}},
        )
        assert r.choices[0].message.content == ref  # exact methods reproduce full prefill
    salted = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                            extra_body={"cache_salt": "tenant-b"})
    assert salted.choices[0].message.content == ref
    assert "sparsex" in r.model_dump()  # how the prompt was served: reuse method, work done
