"""Tokenizer and chat template from the model's own files; prompts made of parts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparsex.segments import Prompt, Segment, SegmentSource, SegmentSpan


class Tokenizer:
    """The model folder's ``tokenizer.json`` (via ``tokenizers``) and its chat template (via jinja2).

    Parts of a prompt are tokenized separately and concatenated, so a segment has the
    same token ids wherever it appears (a requirement for reusing its KV).
    """

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        self.hf = HFTokenizer.from_file(str(path))
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

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False).ids)

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
                toks = self._tokens_of(part.content)
                spans.append(SegmentSpan(len(ids), len(ids) + len(toks), source, part.namespace))
            elif isinstance(part, (str, list)):
                toks = self._tokens_of(part)
            else:
                raise TypeError(f"invalid prompt part {type(part).__name__}: expected str, list[int] or Segment")
            ids.extend(toks)
        return ids, spans

    def _tokens_of(self, content: Any) -> list[int]:
        if isinstance(content, str):
            return self.encode(content)
        if isinstance(content, list) and all(isinstance(t, int) for t in content):
            return list(content)
        raise TypeError("segment content must be a str or a list of token ids")

    def with_bos(self, ids: list[int]) -> list[int]:
        return [self.bos_token_id, *ids] if self.add_bos and self.bos_token_id is not None else ids

    def chat_parts(self, messages: list[dict[str, Any]], namespace: str = "") -> list[str | Segment]:
        """Render ``messages`` with the chat template, as parts: every message's text is a segment.

        A message's ``content`` may be a string or an OpenAI-style list of parts; every text part
        becomes its own segment. The template's scaffolding between them stays plain text.
        """
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        texts: list[str] = []
        flat: list[dict[str, str]] = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError("each chat message needs a 'role' and 'content'")
            content = m.get("content", "")
            if isinstance(content, list):
                pieces = [p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text"]
                if len(pieces) != len(content):
                    raise ValueError("only text content parts are supported")
            elif isinstance(content, str):
                pieces = [content]
            else:
                raise ValueError("message content must be a string or a list of text parts")
            texts.extend(pieces)
            flat.append({"role": str(m["role"]), "content": "".join(pieces)})
        rendered = self.apply_chat_template(flat)
        parts: list[str | Segment] = []
        cursor = 0
        for t in texts:
            at = rendered.find(t, cursor) if t else -1
            if at < 0:
                continue
            if at > cursor:
                parts.append(rendered[cursor:at])
            parts.append(Segment(t, namespace=namespace))
            cursor = at + len(t)
        if cursor < len(rendered):
            parts.append(rendered[cursor:])
        return parts


def _token_str(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return str(tok.get("content")) if tok.get("content") is not None else None
    return tok if isinstance(tok, str) else None
