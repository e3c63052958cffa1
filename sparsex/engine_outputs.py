"""What ``LLM`` hands back: ``RequestOutput``, and the calls that drive requests to it.

``Outputs`` is a mixin of ``LLM`` (sparsex/engine.py), built only on the engine's request
lifecycle (``add_request`` / ``add_tokenized`` -> ``step`` -> ``error_of``):

    generate / chat / next_token_logprobs -> run_to_completion -> output_of -> RequestOutput
    stream                                -> step ... -> text deltas (TextCursor)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sparsex.detokenize import TextCursor
from sparsex.request import Request, RequestMetrics
from sparsex.reuse.options import ReuseOptions, resolve_reuse
from sparsex.sampling_params import SamplingParams
from sparsex.segments import Prompt
from sparsex.tokenizer import Tokenizer


@dataclass
class RequestOutput:
    """What a finished (or streaming) request returns."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    logprobs: list[float]
    metrics: RequestMetrics
    first_logprobs: np.ndarray | None = None
    """With ``keep_first_logits``: log-probabilities over the vocabulary at the first generated token."""
    recomputed_positions: np.ndarray | None = None
    """With ``keep_first_logits``: the prompt positions the prefill ran through the last layer."""
    step_logprobs: np.ndarray | None = None
    """With ``keep_first_logits=n``: [n, V] log-probabilities at each of the first n generated tokens."""


class Outputs:
    """``LLM``'s output side: ``output_of``, ``run_to_completion`` and the calls built on them."""

    # What it uses of the engine (set by ``LLM.__init__``).
    tokenizer: Tokenizer
    reuse: ReuseOptions
    methods: tuple[str, ...]
    _first: dict[str, tuple[torch.Tensor, torch.Tensor]]  # id -> (first logits, recomputed)
    _steps: dict[str, list[torch.Tensor]]  # id -> kept log-probabilities, one per token

    if TYPE_CHECKING:  # the engine's request lifecycle (sparsex/engine.py)

        def add_request(
            self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
            reuse: str | ReuseOptions | dict[str, Any] | None = None, keep_first_logits: bool | int = False,
        ) -> Request: ...

        def add_tokenized(
            self, ids: list[int], params: SamplingParams, spans: Sequence[Any] = (), request_id: str | None = None,
            reuse: str | ReuseOptions | dict[str, Any] | None = None, keep_first_logits: bool | int = False,
        ) -> Request: ...

        def step(self) -> list[Request]: ...

        def error_of(self, req: Request) -> Exception | None: ...

    def output_of(self, req: Request) -> RequestOutput:
        """The request's output so far (with the kept first-token data, which is then forgotten)."""
        first = self._first.pop(req.request_id, None) if req.finished else None
        steps = self._steps.pop(req.request_id, None) if req.finished else None
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            text=req.text,
            finished=req.finished,
            finish_reason=req.finish_reason,
            logprobs=list(req.output_logprobs),
            metrics=req.metrics,
            first_logprobs=None if first is None else torch.log_softmax(first[0], dim=-1).cpu().numpy(),
            recomputed_positions=None if first is None else first[1].numpy(),
            step_logprobs=None if not steps else torch.stack(steps).numpy(),
        )

    # ----- public API ------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | None = None,
        reuse: str | ReuseOptions | dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list of prompts; outputs keep the input order.

        ``reuse`` overrides the engine's reuse method/options for these requests.
        """
        batch = [prompts] if self._is_single(prompts) else list(prompts)
        reqs = [self.add_request(p, sampling_params, reuse=reuse) for p in batch]  # type: ignore[arg-type]
        return self.run_to_completion(reqs)

    def run_to_completion(self, reqs: Sequence[Request]) -> list[RequestOutput]:
        """Step until ``reqs`` finish; their outputs in order. Re-raises the first request's error."""
        while not all(r.finished for r in reqs):
            self.step()
        errors = [e for e in (self.error_of(r) for r in reqs) if e is not None]
        if errors:
            raise errors[0]
        return [self.output_of(r) for r in reqs]

    @staticmethod
    def _is_single(prompts: Any) -> bool:
        if isinstance(prompts, str):
            return True
        return isinstance(prompts, list) and bool(prompts) and all(isinstance(t, int) for t in prompts)

    def chat(
        self,
        messages: list[dict[str, Any]],
        sampling_params: SamplingParams | None = None,
        reuse: str | ReuseOptions | dict[str, Any] | None = None,
    ) -> RequestOutput:
        """One chat turn: the chat template renders ``messages``; every message is a segment."""
        ns = resolve_reuse(self.reuse, reuse, self.methods).namespace
        parts = self.tokenizer.chat_parts(messages, namespace=ns)
        ids, spans = self.tokenizer.encode_prompt(parts, source="chat")
        req = self.add_tokenized(ids, sampling_params or SamplingParams(), spans, reuse=reuse)
        return self.run_to_completion([req])[0]

    def stream(self, req: Request) -> Iterator[str]:
        """Drive the engine until ``req`` finishes, yielding its new text as it grows (the text that
        can no longer change: stop-string holdback and half-decoded characters wait)."""
        cursor = TextCursor(req.params.stop)
        while not req.finished:
            self.step()
            if delta := cursor.advance(req.text, finished=req.finished):
                yield delta
        if delta := cursor.advance(req.text, finished=True):
            yield delta
        if (error := self.error_of(req)) is not None:
            raise error

    def next_token_logprobs(
        self, prompt: Prompt, reuse: str | ReuseOptions | dict[str, Any] | None = None
    ) -> np.ndarray:
        """Log-probabilities over the vocabulary of the token after ``prompt`` (1-D float32)."""
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        req = self.add_request(prompt, params, reuse=reuse, keep_first_logits=True)
        out = self.run_to_completion([req])[0]
        assert out.first_logprobs is not None
        return out.first_logprobs
