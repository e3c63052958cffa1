"""The real benchmarks' loaders (a few MuSiQue items copied into tests/data, a small conversation in
LoCoMo's format), CacheBlend's answer F1, the split boundaries, chat rendering and the found share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsex.lab.quality import reusable_tokens
from sparsex.lab.workloads.common import Markup, render_chat
from sparsex.lab.workloads.item import Chat, prompt_text
from sparsex.lab.workloads.locomo import (
    choose_sessions,
    evidence_sessions,
    locomo_items,
    sessions_of,
)
from sparsex.lab.workloads.musique import (
    INSTRUCTION,
    QUERY,
    musique_items,
    normalize_question,
    passage_text,
)
from sparsex.lab.workloads.real import REAL_WORKLOADS, real_workload
from sparsex.lab.workloads.scoring import answer_f1, f1_score, first_answer, normalize_answer
from sparsex.segments import Segment

DATA = Path(__file__).resolve().parents[1] / "data"


# ----- answer F1 ---------------------------------------------------------------------------------


def test_normalize_answer_drops_case_punctuation_and_articles() -> None:
    assert normalize_answer("The  Exeter College, Oxford!") == "exeter college oxford"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # only whole-word articles go


def test_f1_on_known_strings() -> None:
    assert f1_score("Exeter College.", "exeter college") == 1.0
    assert f1_score("Exeter", "Exeter College") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert f1_score("Oxford", "Exeter College") == 0.0
    assert f1_score("", "") == 1.0 and f1_score("", "Exeter") == 0.0
    # repeated words count as often as they occur on both sides
    assert f1_score("new new york", "new york") == pytest.approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1.0))


def test_answer_f1_reads_the_first_line_and_yes_no_like_cacheblend() -> None:
    assert first_answer("\nExeter College\nThe author studied there.") == "Exeter College"
    assert first_answer("Yes, he did.") == "Yes" and first_answer("no way") == "No"
    assert answer_f1("\nExeter College\nmore text", ["Oxford", "Exeter College"]) == 1.0
    assert answer_f1("anything", []) == 0.0


def test_answer_f1_counts_the_given_units() -> None:
    chars = list  # a tokenizer stand-in: one unit per character
    assert answer_f1("abc", ["abd"], chars) == pytest.approx(2 / 3)
    assert answer_f1("abc", ["abd"]) == 0.0  # as words they differ


# ----- MuSiQue -----------------------------------------------------------------------------------


def test_musique_items_follow_cacheblends_protocol() -> None:
    records = json.loads((DATA / "musique_s.json").read_text())
    items = musique_items(DATA, "tune")
    assert [i.name for i in items] == ["musique-0", "musique-1", "musique-2"]
    for item, record in zip(items, records, strict=True):
        passages = [passage_text(c) for c in record["ctxs"]]
        assert len(passages) == 10 and passages[0] == f"{record['ctxs'][0]['title']}\n\n{record['ctxs'][0]['text']}\n\n"
        assert item.warmup == [[p] for p in passages]  # each passage alone, plain text, first
        assert item.prompt == [INSTRUCTION + "".join(passages) + QUERY + normalize_question(record["question"])
                               + "\nAnswer:"]
        assert item.answers == tuple(record["answers"]) and item.f1_units == "tokens" and item.answer is None


def test_musique_chat_sends_the_same_text_as_messages() -> None:
    plain, chat = musique_items(DATA, "tune", 1)[0], musique_items(DATA, "tune", 1, "chat")[0]
    assert chat.kind == "musique-chat" and chat.name == "musique-chat-0"
    assert isinstance(chat.prompt, Chat) and chat.prompt.messages == (("user", prompt_text(plain.prompt)),)
    assert all(isinstance(w, Chat) and w.messages[0][0] == "user" for w in chat.warmup)


def test_normalize_question_is_cacheblends() -> None:
    assert normalize_question("Where was X born") == "where was X born?"
    assert normalize_question("Who?") == "who?"


def _records(n: int) -> list[dict[str, object]]:
    return [{"question": f"Question {i}", "answers": [f"a{i}"], "ctxs": [{"title": "", "text": f"text {i}"}]}
            for i in range(n)]


def test_musique_split_boundaries(tmp_path: Path) -> None:
    (tmp_path / "musique_s.json").write_text(json.dumps(_records(100)))
    tune, report = musique_items(tmp_path, "tune"), musique_items(tmp_path, "report")
    assert [i.name for i in tune] == [f"musique-{k}" for k in range(50)]
    assert [i.name for i in report] == [f"musique-{k}" for k in range(50, 100)]
    assert musique_items(tmp_path, "report", 3)[0].answers == ("a50",)
    with pytest.raises(ValueError, match="unknown split"):
        musique_items(tmp_path, "test")


def test_a_missing_file_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="CacheBlend"):
        musique_items(tmp_path, "tune")
    with pytest.raises(FileNotFoundError, match="LoCoMo"):
        locomo_items(tmp_path, "tune")


# ----- LoCoMo ------------------------------------------------------------------------------------


def _conversation() -> dict[str, object]:
    conv: dict[str, object] = json.loads((DATA / "locomo.json").read_text())[0]
    return conv


def test_evidence_reads_the_files_malformed_entries_too() -> None:
    assert evidence_sessions({"evidence": ["D3:5", "D1:2", "D3:1"]}) == [1, 3]
    assert evidence_sessions({"evidence": ["D8:6; D9:17"]}) == [8, 9]
    assert evidence_sessions({"evidence": ["D:11:26", "D"]}) == [11]
    assert evidence_sessions({}) == []


def test_sessions_render_every_turn_and_skip_empty_ones() -> None:
    sessions = sessions_of(_conversation()["conversation"])  # type: ignore[arg-type]
    assert sorted(sessions) == [1, 2, 3, 4, 5, 6]  # the seventh session has a date but no turns
    assert sessions[2].text.splitlines()[0] == "Session 2 (6:45 pm on 11 March, 2024):"
    assert "Tomas: A physiotherapist called Dr. Okafor." in sessions[2].text


def test_choose_sessions_takes_evidence_first_then_nearest_neighbours() -> None:
    sessions = sessions_of(_conversation()["conversation"])  # type: ignore[arg-type]
    assert choose_sessions([4], sessions, lambda ks: len(ks) <= 3) == [3, 4, 5]
    assert choose_sessions([2, 6], sessions, lambda ks: len(ks) <= 3) == [1, 2, 6]  # 1 before 3, 5, 7
    assert choose_sessions([6], sessions, lambda ks: len(ks) <= 9) == [1, 2, 3, 4, 5, 6]
    assert choose_sessions([4], sessions, lambda ks: False) == []


def test_locomo_items_put_every_session_at_a_new_offset() -> None:
    items = locomo_items(DATA, "tune", max_tokens=4000)
    assert len(items) == 5  # the adversarial question is left out
    for item in items:
        assert isinstance(item.prompt, Chat) and item.kind == "locomo"
        roles = [r for r, _ in item.prompt.messages]
        assert roles[0] == "system" and roles[-1] == "user" and item.prompt.messages[-1][1].startswith("Question: ")
        sessions = [c for r, c in item.prompt.messages[1:-1]]
        numbers = [int(s.split()[1]) for s in sessions]
        assert numbers == sorted(numbers)
        warm_texts = [[c for _, c in w.messages] for w in item.warmup]  # type: ignore[union-attr]
        for k, texts in zip(numbers, warm_texts, strict=True):
            assert texts[-1] == sessions[numbers.index(k)]  # served earlier, last in its warm-up
            assert len(texts) == (2 if k % 2 == 0 else 1)  # even ones as part of the running conversation
        assert item.answers and item.f1_units == "words"


def test_locomo_prompt_budget_and_plain_sending() -> None:
    short = locomo_items(DATA, "tune", max_tokens=150, sending="plain")
    long = locomo_items(DATA, "tune", max_tokens=4000, sending="plain")
    assert short and all(item.kind == "locomo-plain" and isinstance(item.prompt, list) for item in short)
    for s, item in zip(short, long, strict=True):
        assert s.name == item.name
        assert len(prompt_text(s.prompt)) < len(prompt_text(item.prompt))
        assert (len(prompt_text(s.prompt)) + 3) // 4 + 8 * 3 <= 150  # one session and its markup
        assert prompt_text(item.prompt).endswith("\nAnswer:")


def test_locomo_item_i_does_not_depend_on_n_and_splits_hold_their_conversations(tmp_path: Path) -> None:
    conv = _conversation()
    convs = [{**conv, "sample_id": f"conv-{i}"} for i in range(6)]
    (tmp_path / "locomo.json").write_text(json.dumps(convs))
    tune, report = locomo_items(tmp_path, "tune"), locomo_items(tmp_path, "report")
    assert {i.name.split("-q")[0] for i in tune} == {"locomo-conv-0", "locomo-conv-1", "locomo-conv-2"}
    assert {i.name.split("-q")[0] for i in report} == {"locomo-conv-3", "locomo-conv-4", "locomo-conv-5"}
    assert len(tune) == 15
    assert [i.name for i in locomo_items(tmp_path, "tune", 4)] == [i.name for i in tune[:4]]


def test_real_workload_names() -> None:
    for kind in REAL_WORKLOADS:
        items = real_workload(kind, DATA, "tune", 1)
        assert len(items) == 1 and items[0].kind == kind
    with pytest.raises(ValueError, match="unknown real workload"):
        real_workload("squad", DATA, "tune", 1)


# ----- chat rendering and the found share ------------------------------------------------------


def test_render_chat_writes_each_markup_with_messages_as_segments() -> None:
    chat = Chat((("system", "Be brief."), ("user", "Hi"), ("user", "Q?")))
    assert render_chat(chat, Markup("chatml")) == [
        "<|im_start|>system\n", Segment("Be brief."), "<|im_end|>\n<|im_start|>user\n", Segment("Hi"),
        "<|im_end|>\n<|im_start|>user\n", Segment("Q?"), "<|im_end|>\n<|im_start|>assistant\n"]
    assert render_chat(chat, Markup("gemma")) == [  # no system role: it opens the first user turn
        "<start_of_turn>user\n", Segment("Be brief."), "\n\n", Segment("Hi"), "<end_of_turn>\n<start_of_turn>user\n",
        Segment("Q?"), "<end_of_turn>\n<start_of_turn>model\n"]
    assert render_chat(Chat((("user", "Hi"),)), Markup("plain")) == ["User:\n", Segment("Hi"), "\n\nAssistant:"]


def test_reusable_tokens_counts_runs_shared_with_a_warmup() -> None:
    doc = list(range(100, 140))
    prompt = [1, 2, 3, *doc[5:30], 4, *doc[:10], 5]
    assert reusable_tokens(prompt, [doc], window=16) == 25  # doc[:10] is too short to be a block
    assert reusable_tokens(prompt, [doc], window=8) == 35
    assert reusable_tokens([*doc, 7], [doc], window=16) == 40
    assert reusable_tokens(doc, [doc], window=16) == 39  # the last prompt token is never reused
    assert reusable_tokens(prompt, [], window=16) == 0
