"""The prompts of the peer comparison, built once by the driver and handed to every engine as JSON.

A plan is plain data (strings and ints), so engines in other virtual environments read it without
importing this project:

    {"model_path": str, "warmup": [prompt, ...],
     "groups": [{"name": str, "steps": [{"scenario": str | None, "prompt": str}, ...]}, ...]}

Every engine runs each group once per repeat with its caches emptied first, then the steps in order.
A step whose ``scenario`` is None is a warm request: served (one token) but not timed, so that what
the next timed step may reuse really is in the engine's cache.

    group "docs":        cold P | exact repeat P | reordered rev(P) | half new P[:k/2] + new
    group "musique-<i>": musique cold Q | (empty caches) passage 1 .. passage 10 | musique Q
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# CacheBlend's strings for MuSiQue (its example/blend_musique.py and utils.build_qa_prompt).
MUSIQUE_PREFIX = (
    "You will be asked a question after reading several passages. Please directly answer the question "
    "based on the given passages. Do NOT repeat the question. The answer should be within 5 words..\nPassages:\n"
)
MUSIQUE_QUERY = (
    "\n\nAnswer the question directly based on the given passages. Do NOT repeat the question. "
    "The answer should be within 5 words. \nQuestion:"
)
RESET = {"reset": True}  # a step that empties the engine's caches (between a cold and a warm pass)


def musique_question(question: str) -> str:
    """CacheBlend's normalisation: ``?`` appended if missing, first letter lower-cased."""
    q = question if question.endswith("?") else question + "?"
    return q[0].lower() + q[1:]


def musique_prompts(item: dict[str, Any]) -> tuple[list[str], str]:
    """One MuSiQue item as CacheBlend prompts it: its passages (each prefilled on its own) and the
    whole prompt (instruction, the passages in order, the question)."""
    passages = [f"{c['title']}\n\n{c['text']}\n\n" for c in item["ctxs"]]
    query = f"{MUSIQUE_QUERY}{musique_question(item['question'])}\nAnswer:"
    return passages, MUSIQUE_PREFIX + "".join(passages) + query


def docs_group(docs: list[str], fresh: list[str]) -> dict[str, Any]:
    """cold, exact repeat, reordered (reversed) and half new (the first half of ``docs`` kept in
    place, so that it is a cached prefix, then ``fresh`` documents)."""
    from sparsex.lab.bench.plain import plain_prompt

    half = len(docs) // 2
    prompt = plain_prompt(docs)
    return {"name": "docs", "steps": [
        {"scenario": "cold", "prompt": prompt},
        {"scenario": "exact repeat", "prompt": prompt},
        {"scenario": "reordered", "prompt": plain_prompt(docs[::-1])},
        {"scenario": "half new", "prompt": plain_prompt(docs[:half] + fresh[: len(docs) - half])},
    ]}


def musique_group(index: int, item: dict[str, Any]) -> dict[str, Any]:
    passages, prompt = musique_prompts(item)
    return {"name": f"musique-{index}", "steps": [
        {"scenario": "musique cold", "prompt": prompt},
        RESET,
        *({"scenario": None, "prompt": p} for p in passages),
        {"scenario": "musique", "prompt": prompt},
    ]}


def build_plan(model_path: Path, data_dir: Path, num_docs: int, doc_tokens: int, musique_items: int,
               seed: int = 0) -> dict[str, Any]:
    """Every prompt of one comparison. Deterministic: the same arguments give the same strings."""
    from types import SimpleNamespace

    from sparsex.lab.bench.plain import documents, plain_prompt
    from sparsex.tokenizer import Tokenizer

    # documents() cuts passages by token count; it needs only the tokenizer, not a loaded model.
    tok = SimpleNamespace(tokenizer=Tokenizer(model_path))
    half = num_docs - num_docs // 2
    pool = documents(tok, 2 * num_docs + half, doc_tokens, seed)
    docs, fresh, warm = pool[:num_docs], pool[num_docs : num_docs + half], pool[num_docs + half :]
    groups = [docs_group(docs, fresh)]
    if musique_items:
        items = json.loads((data_dir / "musique_s.json").read_text())[:musique_items]  # tune split: 0-49
        groups += [musique_group(i, item) for i, item in enumerate(items)]
    return {
        "model_path": str(model_path),
        "warmup": [plain_prompt(warm)],  # first-call costs (allocation, compilation) stay out of "cold"
        "groups": groups,
    }


def scenarios(plan: dict[str, Any]) -> list[str]:
    """The timed scenarios of ``plan``, in the order they are first run."""
    names = [s["scenario"] for g in plan["groups"] for s in g["steps"] if s.get("scenario")]
    return list(dict.fromkeys(names))
