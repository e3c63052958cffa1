"""Tokenizer and chat template from the model's own files; prompts made of parts."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from sparsex.segments import Prompt, Segment, SegmentSource, SegmentSpan


class Tokenizer:
    """The model folder's ``tokenizer.json`` (via ``tokenizers``) and its chat template (via jinja2).

    Parts of a prompt are tokenized separately and concatenated, so a segment has the
    same token ids wherever it appears (a requirement for reusing its KV).

    Control tokens (``<|im_start|>``, ...) come only from the chat template's own markup and from
    plain-text prompt parts: a segment's text (every chat message's content) is encoded with its
    special-token strings as ordinary text, like HF's ``split_special_tokens``, so a user cannot
    forge a turn of another role.
    """

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        self.hf = HFTokenizer.from_file(str(path))
        self._hf_plain = HFTokenizer.from_file(str(path))  # special-token strings are plain text
        self._hf_plain.encode_special_tokens = True
        cfg_path = folder / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.special = {k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token")}
        self.bos_token_id = self.token_id(self.special["bos_token"])
        self.eos_token_id = self.token_id(self.special["eos_token"])
        with_special = self.hf.encode("a", add_special_tokens=True).ids
        self.add_bos = self.bos_token_id is not None and with_special[:1] == [self.bos_token_id]
        template = cfg.get("chat_template")
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.has_chat_template = self.chat_template is not None

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise ValueError(f"chat template error: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
        env.globals["raise_exception"] = raise_exception
        tmpl = env.from_string(self.chat_template or "")
        return tmpl.render(
            messages=messages, add_generation_prompt=True, bos_token=self.special["bos_token"] or "",
            eos_token=self.special["eos_token"] or "",
        )

    @property
    def eos_token_ids(self) -> set[int]:
        ids = {self.eos_token_id} if self.eos_token_id is not None else set()
        for tok in ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<|eot_id|>"):
            tid = self.hf.token_to_id(tok)
            if tid is not None:
                ids.add(tid)
        return ids

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_vocab_size())

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (no BOS). ``special_tokens=False``: control-token strings in the
        text are encoded as ordinary text, never as the control tokens themselves."""
        hf = self.hf if special_tokens else self._hf_plain
        return list(hf.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.hf.decode(ids, skip_special_tokens=True))

    def encode_prompt(
        self, prompt: Prompt, source: SegmentSource = "explicit"
    ) -> tuple[list[int], list[SegmentSpan]]:
        """Token ids of a prompt plus the spans of its segments (tagged with ``source``)."""
        if isinstance(prompt, str):
            return self.with_bos(self.encode(prompt)), []
        if not isinstance(prompt, list):
            raise TypeError(f"a prompt is a str, a list of token ids or a list of parts, got {type(prompt)}")
        if all(isinstance(t, int) for t in prompt):
            return [int(t) for t in prompt], []  # type: ignore[union-attr,arg-type,unused-ignore]
        ids: list[int] = self.with_bos([])
        spans: list[SegmentSpan] = []
        for part in prompt:
            if isinstance(part, Segment):
                toks = self._tokens_of(part.content, special_tokens=False)  # data, never control tokens
                spans.append(SegmentSpan(len(ids), len(ids) + len(toks), source, part.namespace))
            elif isinstance(part, (str, list)):
                toks = self._tokens_of(part)
            else:
                raise TypeError(f"invalid prompt part {type(part).__name__}: expected str, list[int] or Segment")
            ids.extend(toks)
        return ids, spans

    def _tokens_of(self, content: Any, special_tokens: bool = True) -> list[int]:
        if isinstance(content, str):
            return self.encode(content, special_tokens)
        if isinstance(content, list) and all(isinstance(t, int) for t in content):
            return list(content)
        raise TypeError("segment content must be a str or a list of token ids")

    def with_bos(self, ids: list[int]) -> list[int]:
        return [self.bos_token_id, *ids] if self.add_bos and self.bos_token_id is not None else ids

    def chat_parts(self, messages: list[dict[str, Any]], namespace: str = "") -> list[str | Segment]:
        """Render ``messages`` with the chat template, as parts: every message's text is a segment.

        A message's ``content`` may be a string or an OpenAI-style list of parts; every text part
        becomes its own segment. The template is rendered with a unique placeholder in place of
        each text part, so the plain-text parts between them are exactly the template's own markup
        (the only place control tokens may come from), whatever the contents contain.
        """
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        texts: list[str] = []
        pieces_of: list[list[str]] = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError("each chat message needs a 'role' and 'content'")
            content = m.get("content", "")
            if isinstance(content, list):
                pieces = [p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text"]
                if len(pieces) != len(content) or not all(isinstance(p, str) for p in pieces):
                    raise ValueError("only text content parts are supported")
            elif isinstance(content, str):
                pieces = [content]
            else:
                raise ValueError("message content must be a string or a list of text parts")
            texts.extend(pieces)
            pieces_of.append(pieces)
        mark = _placeholder_mark(texts)
        flat: list[dict[str, str]] = []
        k = 0
        for m, pieces in zip(messages, pieces_of, strict=True):
            content = "".join(f"{mark}{k + i}{mark}" for i in range(len(pieces)))
            flat.append({"role": str(m["role"]), "content": content})
            k += len(pieces)
        rendered = self.apply_chat_template(flat)
        chunks = rendered.split(mark)  # markup, index, markup, index, ..., markup
        if len(chunks) != 2 * len(texts) + 1 or chunks[1::2] != [str(i) for i in range(len(texts))]:
            raise ValueError("the chat template must place every message's content once, in order")
        parts: list[str | Segment] = []
        markup = ""
        for i, text in enumerate(texts):
            markup += chunks[2 * i]
            if text:  # an empty content is no segment: the markup around it stays one piece
                if markup:
                    parts.append(markup)
                parts.append(Segment(text, namespace=namespace))
                markup = ""
        markup += chunks[-1]
        if markup:
            parts.append(markup)
        return parts


def _placeholder_mark(texts: list[str]) -> str:
    """A string that occurs in none of ``texts`` (random, so a client cannot aim at it)."""
    while True:
        mark = f"\x00{uuid.uuid4().hex}\x00"
        if not any(mark in t for t in texts):
            return mark


def _token_str(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return str(tok.get("content")) if tok.get("content") is not None else None
    return tok if isinstance(tok, str) else None
