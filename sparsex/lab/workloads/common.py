"""Shared helpers of the generators: randomness, codes, text insertion, prompt framing."""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from sparsex.lab.workloads.corpus import Passage, passage_records
from sparsex.lab.workloads.item import Chat, Part
from sparsex.segments import Segment

T = TypeVar("T")

CHARS_PER_TOKEN = 4
STYLES = ("plain", "chatml", "gemma")
_BOUNDARY = re.compile(r"(?<=[.!?])[\"”)]?\s+")


@dataclass(frozen=True)
class Params:
    """Knobs shared by every generator."""

    doc_tokens: int
    """Approximate length of one reusable part (document, turn, message, haystack chunk) in tokens."""
    num_docs: int
    """How many reusable parts an item has (documents, exchanges, haystack chunks)."""
    markup: Markup
    """How roles and the final question are written."""
    answerable: bool
    """For rag, chat and agents: plant a fact and ask for it (else the question has no checkable answer)."""

    @property
    def doc_chars(self) -> int:
        """Target length of one reusable part in characters."""
        return self.doc_tokens * CHARS_PER_TOKEN


@dataclass(frozen=True)
class Markup:
    """Role scaffolding written as plain text.

    ``plain``: ``"User:\\n"`` / ``"Assistant:\\n"`` labels, questions end with ``"Answer:"``
    (works for base models). ``chatml``: ``<|im_start|>role ... <|im_end|>`` markers
    (the SmolLM2-Instruct template), the prompt ends with the assistant's opener. ``gemma``:
    ``<start_of_turn>user|model ... <end_of_turn>`` (Gemma's template: no system role, the system
    text opens the first user turn).
    """

    style: str = "plain"
    """``"plain"``, ``"chatml"`` or ``"gemma"``."""

    def open(self, role: str) -> str:
        """Text that starts a message of ``role`` (user, assistant; system: see ``system``)."""
        if self.style == "chatml":
            return f"<|im_start|>{role}\n"
        if self.style == "gemma":
            return f"<start_of_turn>{'model' if role == 'assistant' else 'user'}\n"
        # a newline, not a space, after the label: parts are tokenized separately and a
        # trailing space would become a lone token before the segment's first word
        return "" if role == "system" else f"{role.capitalize()}:\n"

    def close(self) -> str:
        """Text that ends a message."""
        if self.style == "gemma":
            return "<end_of_turn>\n"
        return "<|im_end|>\n" if self.style == "chatml" else "\n\n"

    def system(self, text: str) -> str:
        """The system message ``text`` and the opener of the user message that follows it."""
        if self.style == "gemma":
            return f"{self.open('user')}{text}\n\n"
        return f"{self.open('system')}{text}{self.close()}{self.open('user')}"

    def reply(self, lead: str = "") -> str:
        """Text that hands over to the assistant, optionally starting its reply with ``lead``."""
        opener = "Assistant:" if self.style == "plain" else self.open("assistant")
        if not lead:
            return opener
        return f"{opener} {lead}" if self.style == "plain" else f"{opener}{lead}"


def markup_style(token_id: Callable[[str], int | None]) -> str:
    """The prompt markup a model was trained on, from its vocabulary (``token_id(str) -> int | None``):
    Gemma's turn markers, else ChatML's, else plain labels."""
    if token_id("<start_of_turn>") is not None:
        return "gemma"
    return "chatml" if token_id("<|im_start|>") is not None else "plain"


def item_rng(kind: str, seed: int, index: int) -> random.Random:
    """The random stream of one item: item ``i`` is the same whatever ``n`` is."""
    return random.Random(f"sparsex-workload:{kind}:{seed}:{index}")


def doc_pool(params: Params, seed: int) -> list[Passage]:
    """Passages of about ``doc_tokens`` tokens (±20%)."""
    target = params.doc_chars
    return passage_records(max(1, target * 4 // 5), max(1, target * 6 // 5), seed)


def pick(rng: random.Random, pool: Sequence[T], k: int) -> list[T]:
    """``k`` distinct elements of ``pool``; a clear error when the corpus is too small."""
    if k > len(pool):
        raise ValueError(f"need {k} passages but only {len(pool)} exist at this length; lower doc_tokens")
    return rng.sample(list(pool), k)


def new_order(rng: random.Random, n: int) -> list[int]:
    """A random permutation of ``range(n)`` that is not the identity (when ``n >= 2``)."""
    order = list(range(n))
    if n < 2:
        return order
    while order == sorted(order):
        rng.shuffle(order)
    return order


def random_code(rng: random.Random) -> str:
    """A code such as ``"QX-48213"`` (two letters, five digits)."""
    letters = "".join(rng.choice(string.ascii_uppercase) for _ in range(2))
    return f"{letters}-{rng.randint(10000, 99999)}"


def random_number(rng: random.Random, digits: int) -> str:
    """A number with exactly ``digits`` digits, as text."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_names(
    rng: random.Random, count: int, length: int = 5, alphabet: str = string.ascii_uppercase
) -> list[str]:
    """``count`` distinct random names of ``length`` letters."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(alphabet) for _ in range(length))
        if name not in names:
            names.append(name)
    return names


def sentence_boundaries(text: str) -> list[int]:
    """Offsets where a sentence starts: 0, after each sentence end, and ``len(text)``."""
    return [0, *(m.end() for m in _BOUNDARY.finditer(text)), len(text)]


def insert_at(text: str, offset: int, sentence: str) -> str:
    """Insert ``sentence`` at a sentence boundary ``offset`` of ``text``, keeping spacing."""
    if offset <= 0:
        return f"{sentence} {text}" if text else sentence
    before, after = text[:offset], text[offset:]
    if not before[-1].isspace():
        before += " "
    if after and not after[0].isspace():
        sentence += " "
    return f"{before}{sentence}{after}"


def insert_sentence(rng: random.Random, text: str, sentence: str) -> str:
    """Insert ``sentence`` at a random sentence boundary of ``text``."""
    return insert_at(text, rng.choice(sentence_boundaries(text)), sentence)


def insert_many(rng: random.Random, text: str, sentences: Sequence[str]) -> str:
    """Insert ``sentences`` at random sentence boundaries of ``text``, keeping their order."""
    bounds = sentence_boundaries(text)
    offsets = sorted(rng.choice(bounds) for _ in sentences)
    for offset, sentence in reversed(list(zip(offsets, sentences, strict=True))):
        text = insert_at(text, offset, sentence)  # back to front: earlier offsets stay valid
    return text


def merge(parts: Sequence[Part]) -> list[Part]:
    """Drop empty strings and join adjacent plain strings (segments stay as they are)."""
    out: list[Part] = []
    for part in parts:
        if isinstance(part, str):
            if not part:
                continue
            if out and isinstance(out[-1], str):
                out[-1] = out[-1] + part
                continue
        out.append(part)
    return out


def frame(markup: Markup, system: str, body: Sequence[Part], question: str, lead: str = "") -> list[Part]:
    """A single-turn prompt: system text, then ``body``, then ``question`` and the answer cue.

    ``lead`` starts the answer (e.g. ``"The pass key is"``) so that the next
    token is the answer itself.
    """
    if markup.style != "plain":
        head = markup.system(system)
        tail = f"\n\n{question}{markup.close()}{markup.reply(lead)}"
    else:
        head = f"{system}\n\n"
        tail = f"\n\n{question}\nAnswer:" + (f" {lead}" if lead else "")
    return merge([head, *body, tail])


def stacked(header: Sequence[str], segments: Sequence[Segment], sep: str = "\n\n") -> list[Part]:
    """Segments each preceded by its plain ``header`` and separated by ``sep``."""
    parts: list[Part] = []
    for j, (head, seg) in enumerate(zip(header, segments, strict=True)):
        parts.extend([sep if j else "", head, seg])
    return merge(parts)


def render_chat(chat: Chat, markup: Markup) -> list[Part]:
    """``chat`` written in ``markup`` the way a chat template writes it: markers as plain text, every
    message's content a segment, ending with the assistant's opener (for models without a template).
    Gemma has no system role: the system text opens the first user turn."""
    parts: list[Part] = []
    user_open = False  # a user turn opened by the system text (gemma) takes the next user message
    for role, content in chat.messages:
        if role == "system":
            if markup.style == "gemma":
                parts += [markup.open("user"), Segment(content), "\n\n"]
                user_open = True
            else:
                parts += [markup.open("system"), Segment(content), markup.close()]
            continue
        if not (user_open and role == "user"):
            parts.append(markup.open(role))
        user_open = False
        parts += [Segment(content), markup.close()]
    parts.append(markup.reply())
    return merge(parts)
