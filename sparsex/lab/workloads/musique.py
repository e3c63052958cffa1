"""MuSiQue the way CacheBlend runs it: retrieved passages prefilled alone, then pasted into one prompt.

The file is CacheBlend's ``inputs/musique_s.json`` (github.com/YaoJiayi/CacheBlend; MuSiQue by
Trivedi et al., 2022, CC BY 4.0): per item a question, its gold answers and ten retrieved
Wikipedia passages. Its example ``blend_musique.py`` is the protocol:

    warm-up    one prompt per passage:   "{title}\\n\\n{text}\\n\\n"                (alone)
    test       INSTRUCTION + passage 1 + ... + passage 10 + QUERY + question + "\\nAnswer:"

sent as one plain string (``musique``: a completion request, no annotations) or as one user
message through the chat template (``musique-chat``). Answers are scored by CacheBlend's token F1
(``scoring.py``: the model's tokens of the normalized text). Neighbouring passages often overlap
(windows of the same article), as retrieved chunks do.

Splits (the data README): tune = items 0-49, report = items 50-99.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparsex.lab.workloads.item import Chat, Prompt, WorkItem

FILE = "musique_s.json"
SPLITS = {"tune": range(0, 50), "report": range(50, 100)}
"""Item indices of each split in ``musique_s.json``."""

INSTRUCTION = (
    "You will be asked a question after reading several passages. Please directly answer the question "
    "based on the given passages. Do NOT repeat the question. The answer should be within 5 words..\n"
    "Passages:\n"
)
"""CacheBlend's instruction before the passages (its typo "words.." included)."""
QUERY = (
    "\n\nAnswer the question directly based on the given passages. Do NOT repeat the question. "
    "The answer should be within 5 words. \nQuestion:"
)
"""CacheBlend's text between the passages and the question."""
SENDINGS = ("plain", "chat")


def normalize_question(question: str) -> str:
    """CacheBlend's form of the question: ends with "?", first letter lower-cased."""
    if not question.endswith("?"):
        question += "?"
    return question[0].lower() + question[1:]


def passage_text(ctx: dict[str, Any]) -> str:
    """One retrieved passage as CacheBlend writes it."""
    return f"{ctx['title']}\n\n{ctx['text']}\n\n"


def prompt_string(record: dict[str, Any]) -> str:
    """The test prompt of one record as one string."""
    body = "".join(passage_text(c) for c in record["ctxs"])
    return f"{INSTRUCTION}{body}{QUERY}{normalize_question(record['question'])}\nAnswer:"


def musique_item(record: dict[str, Any], index: int, sending: str = "plain") -> WorkItem:
    """The work item of record ``index`` of the file, sent as a plain string or a chat message."""
    if sending not in SENDINGS:
        raise ValueError(f"unknown sending {sending!r}; choose from {', '.join(SENDINGS)}")
    passages = [passage_text(c) for c in record["ctxs"]]
    text = prompt_string(record)
    warmup: list[Prompt]
    prompt: Prompt
    if sending == "plain":
        warmup, prompt = [[p] for p in passages], [text]
    else:
        warmup, prompt = [Chat((("user", p),)) for p in passages], Chat((("user", text),))
    kind = "musique" if sending == "plain" else "musique-chat"
    answers = tuple(str(a) for a in record["answers"])
    return WorkItem(f"{kind}-{index}", warmup, prompt, None, kind, answers=answers, f1_units="tokens")


def load_records(data_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of ``musique_s.json`` in ``data_dir``; a clear error when it is missing."""
    path = Path(data_dir) / FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: pass --data DIR with CacheBlend's {FILE} (inputs/{FILE} of "
            "github.com/YaoJiayi/CacheBlend)"
        )
    records: list[dict[str, Any]] = json.loads(path.read_text())
    return records


def musique_items(
    data_dir: str | Path, split: str, n: int | None = None, sending: str = "plain"
) -> list[WorkItem]:
    """The first ``n`` items of ``split`` (all when None), in file order; item names carry the
    record's index in the file."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    records = load_records(data_dir)
    indices = [i for i in SPLITS[split] if i < len(records)]
    return [musique_item(records[i], i, sending) for i in indices[:n]]
