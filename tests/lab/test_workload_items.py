"""Every scenario: determinism, reuse structure, answers, sizes."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from sparsex.lab.workloads import (
    WORKLOADS,
    WorkItem,
    describe,
    make_workload,
    prompt_text,
    reused_segments,
    segments_of,
)
from sparsex.lab.workloads.item import Part, part_text
from sparsex.segments import Segment


def small(kind: str, n: int, seed: int, style: str = "plain", answerable: bool = True) -> list[WorkItem]:
    """Tiny items: 4 reusable parts of ~40 tokens."""
    return make_workload(kind, n, seed, doc_tokens=40, num_docs=4, style=style, answerable=answerable)


def _prefix_before(parts: list[Part], index: int) -> str:
    return prompt_text(parts[:index])


def _contexts(prompt: list[Part], seg: Segment) -> list[str]:
    """The text before each occurrence of ``seg`` in ``prompt``."""
    return [_prefix_before(prompt, j) for j, p in enumerate(prompt) if p == seg]


@pytest.mark.parametrize("kind", WORKLOADS)
def test_same_seed_same_items_other_seed_other_items(kind: str) -> None:
    a = small(kind, 3, 7)
    b = small(kind, 3, 7)
    c = small(kind, 3, 8)
    assert a == b
    assert [i.prompt for i in a] != [i.prompt for i in c]
    assert len({prompt_text(i.prompt) for i in a}) == 3  # items differ from each other


@pytest.mark.parametrize("kind", WORKLOADS)
def test_item_i_does_not_depend_on_n(kind: str) -> None:
    assert small(kind, 2, 3) == small(kind, 4, 3)[:2]


@pytest.mark.parametrize("kind", WORKLOADS)
@pytest.mark.parametrize("style", ["plain", "chatml", "gemma"])
def test_segments_reappear_in_another_context(kind: str, style: str) -> None:
    for item in small(kind, 3, 1, style=style):
        assert item.kind == kind and item.name.startswith(f"{kind}-")
        assert item.warmup and all(segments_of(w) for w in item.warmup)
        segs = segments_of(item.prompt)
        assert len(segs) >= 2
        assert reused_segments(item) == segs  # every test segment was warmed up
        assert isinstance(item.prompt[-1], str)  # the prompt ends with plain text
        for j, part in enumerate(item.prompt[:-1]):  # no lone-space token before a segment
            if isinstance(item.prompt[j + 1], Segment) and isinstance(part, str):
                assert not part.endswith(" ")
        for seg in segs:
            text = part_text(seg)
            assert text and text == text.strip()
            warm_contexts = [c for w in item.warmup for c in _contexts(w, seg)]
            assert warm_contexts
            for context in _contexts(item.prompt, seg):
                assert context not in warm_contexts, f"{item.name}: a segment keeps its warm-up context"


@pytest.mark.parametrize("kind", ["rag", "agents", "needle", "vartrack", "cwe", "fwe", "lookup", "combine"])
def test_the_order_of_segments_changes(kind: str) -> None:
    for item in small(kind, 3, 2):
        warm_order = [s for w in item.warmup for s in segments_of(w)]
        test_order = segments_of(item.prompt)
        kept = [s for s in warm_order if s in test_order]
        assert kept != test_order


@pytest.mark.parametrize("kind", WORKLOADS)
def test_answers_sit_inside_reused_segments(kind: str) -> None:
    for item in small(kind, 4, 5):
        assert item.answer
        inside = [s for s in segments_of(item.prompt) if item.answer in part_text(s)]
        assert inside, f"{item.name}: answer {item.answer!r} not in any segment"
        if kind in ("rag", "chat", "agents", "needle", "lookup", "combine"):
            assert prompt_text(item.prompt).count(item.answer) == 1
            assert len(inside) == 1


@pytest.mark.parametrize("kind", ["rag", "chat", "agents"])
def test_unanswerable_variants_have_no_answer(kind: str) -> None:
    items = small(kind, 2, 0, answerable=False)
    assert all(i.answer is None for i in items)


def test_lookup_plants_one_fact_and_asks_for_it() -> None:
    for item in make_workload("lookup", 6, seed=2, doc_tokens=80, num_docs=4, style="chatml"):
        segs = [part_text(s) for s in segments_of(item.prompt)]
        holders = [t for t in segs if "The access code for the" in t]
        assert len(segs) == 4 and len(holders) == 1 and f"is {item.answer}." in holders[0]
        place = re.search(r"access code for the ([a-z ]+) is", holders[0])
        assert place is not None
        assert prompt_text(item.prompt).endswith(f"<|im_start|>assistant\nThe access code for the {place.group(1)} is")


def test_combine_needs_two_documents() -> None:
    for item in make_workload("combine", 6, seed=2, doc_tokens=80, num_docs=4, style="chatml"):
        segs = [part_text(s) for s in segments_of(item.prompt)]
        route = [t for t in segs if "must use the" in t]
        codes = [t for t in segs if "The access code for the" in t]
        assert len(route) == 1 and len(codes) == 2  # the entrance's code and another entrance's
        entrance = re.search(r"must use the ([a-z ]+)\.", route[0])
        assert entrance is not None and item.answer is not None and item.answer not in route[0]
        holder = [t for t in codes if f"The access code for the {entrance.group(1)} is {item.answer}." in t]
        assert len(holder) == 1 and holder[0] != route[0]
        assert "Visitors from" in prompt_text(item.prompt).rsplit("<|im_start|>assistant", 1)[1]
        for warm in item.warmup:  # no warm-up prompt holds both hops
            text = prompt_text(warm)
            assert not ("must use the" in text and item.answer in text)


def test_rag_tests_a_subset_that_holds_the_fact() -> None:
    items = make_workload("rag", 12, seed=4, doc_tokens=40, num_docs=6)
    sizes = {len(segments_of(i.prompt)) for i in items}
    assert min(sizes) >= 4 and max(sizes) <= 6 and len(sizes) > 1
    for item in items:
        assert len(item.warmup) == 6
        assert "Question: According to the documents" in part_text(item.prompt[-1])


def test_chat_variants_trim_the_window_or_change_the_system_prompt() -> None:
    window, system, both = make_workload("chat", 3, seed=0, doc_tokens=40, num_docs=6)
    for item, trimmed, new_system in ((window, True, False), (system, False, True), (both, True, True)):
        warm = item.warmup[0]
        warm_segs, test_segs = segments_of(warm), segments_of(item.prompt)
        assert (len(test_segs) < len(warm_segs)) == trimmed
        assert test_segs == warm_segs[len(warm_segs) - len(test_segs) :]  # the newest turns are kept
        assert (part_text(warm[0]) != part_text(item.prompt[0])) == new_system


def _resolve(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", text):
        values[name] = values.get(rhs[4:], "?") if rhs.startswith("VAR ") else rhs
    return values


def test_vartrack_chain_runs_across_segments() -> None:
    for item in make_workload("vartrack", 5, seed=9, doc_tokens=40, num_docs=6):
        text = prompt_text(item.prompt)
        value = re.search(r"assigned the value (\d+) in the text", text)
        assert value is not None and item.answer is not None
        values = _resolve(text)
        chain = [name for name, v in values.items() if v == value.group(1)]
        assert len(chain) == 5 and chain[-1] == item.answer
        assert len(values) > len(chain)  # a distractor chain exists
        holders = [
            j for j, s in enumerate(segments_of(item.prompt)) for n in chain if f"VAR {n} =" in part_text(s)
        ]
        # one link per segment, in prompt order
        assert holders == sorted(holders) and len(set(holders)) == len(chain)
        for warm in item.warmup:  # no warm-up prompt alone resolves the answer
            assert _resolve(prompt_text(warm)).get(item.answer) != value.group(1)


@pytest.mark.parametrize("kind", ["cwe", "fwe"])
def test_word_extraction_answer_is_strictly_most_frequent(kind: str) -> None:
    for item in small(kind, 3, 6):
        words = " ".join(part_text(s) for s in segments_of(item.prompt)).replace(",", " ").split()
        (first, n1), (_, n2) = Counter(words).most_common(2)
        assert first == item.answer and n1 > n2


@pytest.mark.parametrize("kind", WORKLOADS)
def test_sizes_scale_with_doc_tokens(kind: str) -> None:
    small = describe(make_workload(kind, 1, seed=0, doc_tokens=50, num_docs=4)[0])
    large = describe(make_workload(kind, 1, seed=0, doc_tokens=200, num_docs=4)[0])
    assert int(large["segment_chars"]) > 3 * int(small["segment_chars"])
    # rag drops docs, chat adds user turns, agents has 3 messages; fwe is sized in real tokens
    if kind not in ("rag", "chat", "agents", "fwe"):
        approx = int(large["approx_tokens"])
        assert 0.7 * 800 <= approx <= 1.6 * 800


def test_benchmark_sized_items() -> None:
    for kind in WORKLOADS:
        item = make_workload(kind, 1, seed=0, doc_tokens=600, num_docs=6)[0]
        assert int(describe(item)["approx_tokens"]) > 1000


def test_describe_adds_up() -> None:
    item: WorkItem = small("rag", 1, 0)[0]
    d = describe(item)
    assert d["name"] == "rag-0" and d["kind"] == "rag"
    assert d["prompt_chars"] == int(d["segment_chars"]) + int(d["plain_chars"])
    assert d["prompt_segments"] == d["reused_segments"] == len(segments_of(item.prompt))
    assert d["warmup_prompts"] == 4


def test_chatml_markers_are_plain_text() -> None:
    item = small("chat", 1, 0, style="chatml")[0]
    plain = [p for p in item.prompt if isinstance(p, str)]
    assert plain[0].startswith("<|im_start|>system\n")
    assert plain[-1].endswith("<|im_start|>assistant\n")
    assert not any("<|im_" in part_text(s) for s in segments_of(item.prompt))


@pytest.mark.parametrize("kind", ["chat", "agents", "rag", "lookup"])
def test_gemma_markup_has_turns_and_no_system_role(kind: str) -> None:
    """Gemma's template: the system text opens the first user turn; assistant turns are "model"."""
    item = small(kind, 1, 0, style="gemma")[0]
    text = prompt_text(item.prompt)
    assert text.startswith("<start_of_turn>user\n") and "system" not in re.findall(r"<start_of_turn>(\w+)", text)
    assert re.search(r"<end_of_turn>\n<start_of_turn>model\n[^<]*$", text)  # hands over to the model last
    assert text.count("<start_of_turn>") == text.count("<end_of_turn>") + 1  # only the reply is open
    if kind == "chat":
        assert "<start_of_turn>model\n" in text.split("<end_of_turn>")[1]  # an earlier assistant turn
    assert not any("<start_of_turn>" in part_text(s) for s in segments_of(item.prompt))


def test_markup_style_follows_the_vocabulary() -> None:
    from sparsex.lab.bench.evaluate import markup_style

    def vocab(*tokens: str):  # type: ignore[no-untyped-def]
        return lambda t: 1 if t in tokens else None

    assert markup_style(vocab("<start_of_turn>", "<end_of_turn>")) == "gemma"
    assert markup_style(vocab("<|im_start|>")) == "chatml"
    assert markup_style(vocab("</s>")) == "plain"


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        make_workload("nope", 1, 0)
    with pytest.raises(ValueError):
        make_workload("rag", 1, 0, style="xml")
    with pytest.raises(ValueError):
        make_workload("vartrack", 1, 0, num_docs=1)
    with pytest.raises(ValueError):
        make_workload("rag", 1, 0, doc_tokens=0)
