"""LoCoMo: multi-round chat memory, earlier sessions re-inserted at new offsets (the paper's benchmark).

The file is ``data/locomo10.json`` of github.com/snap-research/LoCoMo (Maharana et al., 2024;
CC BY-NC 4.0): long conversations between two people in 19-32 dated sessions, with questions
whose ``evidence`` names the dialogue turns that hold the answer (``D3:5``: turn 5 of the third session).

One item per question (adversarial questions, which have no answer, are left out):

    context   the sessions holding the evidence, then their neighbours (nearest first), while the
              prompt stays within ``max_tokens``; in chronological order
    warm-up   every context session was served earlier, on its own (odd sessions and the first)
              or as part of the running conversation (even ones: the session before it, then it),
              so in the test prompt every session sits at a new offset after other text
    test      instruction + the sessions + the question

sent as chat messages (``locomo``: the instruction as the system message, each session one user
message, the question the last one; rendered by the model's chat template) or as one plain string
(``locomo-plain``). Answers are scored by word F1 (``scoring.py``).

Splits (the data README): tune = conversations 0-2, report = conversations 3-5.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsex.lab.workloads.item import Chat, Prompt, WorkItem, prompt_text

FILE = "locomo.json"
SPLITS = {"tune": range(0, 3), "report": range(3, 6)}
"""Conversation indices of each split in the file."""
SENDINGS = ("chat", "plain")
DEFAULT_MAX_TOKENS = 4000
"""Prompt budget of an item: fits both real models' contexts with room to generate."""
MARKUP_TOKENS = 8
"""Tokens a chat template may add around each message, counted against the budget."""
ADVERSARIAL = 5
"""LoCoMo's category of questions with no answer in the conversation."""
_EVIDENCE = re.compile(r"D:?(\d+):(\d+)")


def instruction(speaker_a: str, speaker_b: str) -> str:
    return (f"Below are earlier sessions of a conversation between {speaker_a} and {speaker_b}. "
            "Answer the question about them in a short phrase, using their words where possible.")


@dataclass(frozen=True)
class Session:
    """One dated session of a conversation, rendered as text."""

    number: int
    text: str


def sessions_of(conversation: dict[str, Any]) -> dict[int, Session]:
    """Every session with turns, by number: a ``Session <number> (<date>):`` line, then one ``Speaker: text`` line a
    turn (a shared photo's caption in brackets)."""
    out: dict[int, Session] = {}
    for key, turns in conversation.items():
        m = re.fullmatch(r"session_(\d+)", key)
        if not m or not turns:
            continue
        k = int(m.group(1))
        lines = [f"Session {k} ({conversation.get(f'session_{k}_date_time', 'undated')}):"]
        for turn in turns:
            caption = f" [shares a photo: {turn['blip_caption']}]" if turn.get("blip_caption") else ""
            lines.append(f"{turn['speaker']}: {turn['text']}{caption}")
        out[k] = Session(k, "\n".join(lines))
    return out


def evidence_sessions(qa: dict[str, Any]) -> list[int]:
    """Session numbers named by a question's evidence (``D3:5``; the file's few malformed
    entries such as ``D8:6; D9:17`` or ``D:11:26`` are read too), ascending, without repeats."""
    found = {int(s) for e in qa.get("evidence", []) for s, _ in _EVIDENCE.findall(str(e))}
    return sorted(found)


def choose_sessions(
    evidence: list[int], sessions: dict[int, Session], fits: Callable[[list[int]], bool]
) -> list[int]:
    """Evidence sessions first, then their neighbours nearest first, each kept if the prompt still
    ``fits``; chronological order."""
    chosen: list[int] = []
    candidates = [k for k in evidence if k in sessions]
    for distance in range(1, max(sessions) + 1):
        for k in evidence:
            candidates += [j for j in (k - distance, k + distance) if j in sessions]
    for k in dict.fromkeys(candidates):
        if fits(sorted([*chosen, k])):
            chosen.append(k)
    return sorted(chosen)


def _render(sending: str, system: str, blocks: list[str], question: str | None) -> Prompt:
    """A chat (system + one user message per block + the question) or one plain string."""
    if sending == "chat":
        msgs = [("system", system)] if system else []
        msgs += [("user", b) for b in blocks]
        if question is not None:
            msgs.append(("user", f"Question: {question}"))
        return Chat(tuple(msgs))
    head = f"{system}\n\n" if system else ""
    tail = "" if question is None else f"\n\nQuestion: {question}\nAnswer:"
    return [head + "\n\n".join(blocks) + tail]


def locomo_item(
    conv: dict[str, Any], qa: dict[str, Any], name: str, sending: str = "chat",
    max_tokens: int = DEFAULT_MAX_TOKENS, count_tokens: Callable[[str], int] | None = None,
) -> WorkItem | None:
    """The item of one question, or None when not even one evidence session fits ``max_tokens``
    (``count_tokens``: the model's token count of a text; default ~4 characters a token)."""
    if sending not in SENDINGS:
        raise ValueError(f"unknown sending {sending!r}; choose from {', '.join(SENDINGS)}")
    count = count_tokens or (lambda text: (len(text) + 3) // 4)
    c = conv["conversation"]
    sessions = sessions_of(c)
    system = instruction(c["speaker_a"], c["speaker_b"])
    question = str(qa["question"])

    def fits(ks: list[int]) -> bool:  # the prompt's text, and room for a chat template's markers
        text = prompt_text(_render(sending, system, [sessions[k].text for k in ks], question))
        return count(text) + MARKUP_TOKENS * (len(ks) + 2) <= max_tokens

    chosen = choose_sessions(evidence_sessions(qa), sessions, fits)
    if not chosen:
        return None
    warmup: list[Prompt] = []
    for k in chosen:
        running = k % 2 == 0 and k - 1 in sessions
        blocks = [sessions[k - 1].text, sessions[k].text] if running else [sessions[k].text]
        warmup.append(_render(sending, "", blocks, None))
    prompt = _render(sending, system, [sessions[k].text for k in chosen], question)
    kind = "locomo" if sending == "chat" else "locomo-plain"
    return WorkItem(f"{kind}-{name}", warmup, prompt, None, kind, answers=(str(qa["answer"]),), f1_units="words")


def load_conversations(data_dir: str | Path) -> list[dict[str, Any]]:
    """Every conversation of ``locomo.json`` in ``data_dir``; a clear error when it is missing."""
    path = Path(data_dir) / FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: pass --data DIR with LoCoMo's conversations (data/locomo10.json of "
            "github.com/snap-research/LoCoMo, saved as locomo.json)"
        )
    convs: list[dict[str, Any]] = json.loads(path.read_text())
    return convs


def locomo_items(
    data_dir: str | Path, split: str, n: int | None = None, sending: str = "chat",
    max_tokens: int = DEFAULT_MAX_TOKENS, count_tokens: Callable[[str], int] | None = None,
) -> list[WorkItem]:
    """``n`` questions of the split's conversations (all when None) in a fixed shuffled order (item
    ``i`` does not depend on ``n``), adversarial and unanswered questions left out. Item names are
    ``{sample_id}-q{question index}``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    convs = load_conversations(data_dir)
    pairs = [(ci, qi) for ci in SPLITS[split] if ci < len(convs)
             for qi, qa in enumerate(convs[ci]["qa"])
             if qa.get("category") != ADVERSARIAL and qa.get("answer") is not None and evidence_sessions(qa)]
    random.Random(f"sparsex-locomo:{split}").shuffle(pairs)
    items: list[WorkItem] = []
    for ci, qi in pairs:
        if n is not None and len(items) >= n:
            break
        conv = convs[ci]
        item = locomo_item(conv, conv["qa"][qi], f"{conv.get('sample_id', ci)}-q{qi}", sending, max_tokens,
                           count_tokens)
        if item is not None:
            items.append(item)
    return items
