"""What a request hands back: ``RequestOutput``, built from the request's own state."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparsex.core.request import Request, RequestMetrics


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


def output_of(req: Request) -> RequestOutput:
    """The request's output so far; once it finished, with what it kept for analysis (handed over
    once: the request forgets it)."""
    kept = req.kept if req.finished else None
    if kept is not None:
        req.kept = None
    first = None if kept is None else kept.first
    steps = None if kept is None else kept.steps
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
