"""Request bodies of the OpenAI-compatible API, and OpenAI-style errors.

Bodies are validated by pydantic models here (not by FastAPI's signature magic), so that every
bad input becomes one ``APIError`` with status 400 and the offending ``param``; fields the server
does not implement (``tools``, ``presence_penalty``, ...) are accepted and ignored.

Types are strict (``n: "2"`` or ``stream: "yes"`` is a 400, not coerced) and numbers finite.
The raw body is bounded and parsed in ``limits.py``.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from sparsex.sampling_params import MIN_TEMPERATURE

# Every body model: no coercion, no inf / NaN; unknown fields ignored unless a model forbids them.
STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_NAMESPACE_CHARS = 256

RETRY_AFTER_S = 1
"""``Retry-After`` of every 429 (queue full) and 503 (shutting down, aborted): the queue moves in
engine steps, and a draining replica is replaced behind its balancer within seconds."""
RETRY_HEADERS = {"Retry-After": str(RETRY_AFTER_S)}


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

    def headers(self) -> dict[str, str] | None:
        """Headers the status calls for: how to authenticate (401), when to retry (429, 503)."""
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if self.status in (429, 503):
            return dict(RETRY_HEADERS)
        return None


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ----- request bodies ----------------------------------------------------------------------------


class SparsexOptions(BaseModel):
    """The ``"sparsex"`` extension object (``extra_body={"sparsex": {...}}`` in the openai client).

    reuse: KV reuse method for this request (one of ``sparsex.reuse.options.METHODS``).
    namespace: tenant namespace salting every cache hash (overrides ``cache_salt``).
    budget: recompute budget, a fraction of the reused tokens in [0, 1].
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    reuse: str | None = None
    namespace: str | None = Field(default=None, max_length=MAX_NAMESPACE_CHARS)
    budget: float | None = Field(default=None, ge=0.0, le=1.0)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = STRICT

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # vLLM-style extension
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = Field(default=None, max_length=16)
    stop_token_ids: list[StrictInt] | None = Field(default=None, max_length=256)  # vLLM-style extension
    ignore_eos: bool = False  # vLLM-style extension
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    cache_salt: str | None = Field(default=None, max_length=MAX_NAMESPACE_CHARS)
    sparsex: SparsexOptions | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature_not_tiny(cls, v: float | None) -> float | None:
        if v is not None and 0.0 < v < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if any(len(s) > 1024 for s in stops):
            raise ValueError("stop strings must be at most 1024 characters")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
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

    model_config = STRICT

    documents: list[str | dict[str, Any]] = Field(min_length=1, max_length=64)
    namespace: str = Field(default="", max_length=MAX_NAMESPACE_CHARS)

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
        names = []
        for i, d in enumerate(self.documents):
            name = d.get("name") if isinstance(d, dict) else None
            if name is not None and not isinstance(name, str):
                raise bad_request("a document's name must be a string", f"documents[{i}].name")
            names.append(name or "")
        return names if any(names) else None


# ----- parsing -----------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


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
