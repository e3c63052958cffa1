"""Request bodies of the OpenAI-compatible API, and OpenAI-style errors.

Bodies are validated by pydantic models here (not by FastAPI's signature magic), so that every
bad input becomes one ``APIError`` with status 400 and the offending ``param``; fields the server
does not implement (``tools``, ``presence_penalty``, ...) are accepted and ignored.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

# The reuse methods of SPEC.md, used when the engine does not list its own (sparsex.reuse.options).
REUSE_METHODS = ("none", "prefix", "naive", "epic", "cacheblend", "sparsex")


def reuse_methods() -> tuple[str, ...]:
    """The reuse methods the engine offers."""
    try:
        from sparsex.reuse.options import SERVING_METHODS
    except ImportError:
        return REUSE_METHODS
    return tuple(SERVING_METHODS)


class APIError(Exception):
    """An error the client sees as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ----- request bodies ----------------------------------------------------------------------------


class SparsexOptions(BaseModel):
    """The ``"sparsex"`` extension object (``extra_body={"sparsex": {...}}`` in the openai client).

    reuse: KV reuse method for this request (one of ``REUSE_METHODS``).
    namespace: tenant namespace salting every cache hash (overrides ``cache_salt``).
    budget: recompute budget, a fraction of the reused tokens in [0, 1].
    """

    model_config = ConfigDict(extra="forbid")

    reuse: str | None = None
    namespace: str | None = None
    budget: float | None = Field(default=None, ge=0.0, le=1.0)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # vLLM-style extension
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None  # vLLM-style extension
    ignore_eos: bool = False  # vLLM-style extension
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    cache_salt: str | None = None
    sparsex: SparsexOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v == "" or (isinstance(v, list) and any(not s for s in v)):
            raise ValueError("stop strings must be non-empty")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def message_dicts(self) -> list[dict[str, Any]]:
        out = []
        for i, m in enumerate(self.messages):
            content = m.content if m.content is not None else ""
            if isinstance(content, list):
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise bad_request("only text content parts are supported", f"messages[{i}].content")
            out.append({"role": m.role, "content": content})
        return out


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: int | None = Field(default=None, ge=0, le=5)

    def prompt_list(self) -> list[str | list[int]]:
        """The batch of prompts: one string, a list of strings, token ids, or lists of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class SegmentsRequest(BaseModel):
    """``POST /v1/segments``: documents to pin; each is a string or ``{"text": ..., "name": ...}``."""

    model_config = ConfigDict(extra="ignore")

    documents: list[str | dict[str, Any]] = Field(min_length=1)
    namespace: str = ""

    def texts(self) -> list[str]:
        out = []
        for i, d in enumerate(self.documents):
            text = d if isinstance(d, str) else d.get("text")
            if not isinstance(text, str) or not text:
                raise bad_request("each document must be a non-empty string or {\"text\": ...}", f"documents[{i}]")
            out.append(text)
        return out

    def names(self) -> list[str] | None:
        """Optional display names (``""`` where a document has none); None when no document has one."""
        names = [str(d.get("name") or "") if isinstance(d, dict) else "" for d in self.documents]
        return names if any(names) else None


# ----- parsing -----------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return body


def parse_body(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def validation_error(errors: Any) -> APIError:
    """The first pydantic / FastAPI validation error as a 400."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return bad_request(f"{param}: {msg}" if param else msg, param=param, code="invalid_value")
