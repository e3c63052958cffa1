"""Turn logits into tokens: greedy, temperature, top-k, top-p, per-request seeds.

Numerically safe for every ``SamplingParams`` it accepts: the temperature is never below
``MIN_TEMPERATURE`` (so ``logits / temperature`` stays finite for finite logits), and logits that
are not finite (a model bug, an overflow) fall back to the argmax of the finite ones instead of
raising inside the engine step, where one request's failure would end every request of the batch.
"""

from __future__ import annotations

import torch

from sparsex.sampling_params import MIN_TEMPERATURE, SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy or params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed)
    return g


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, index: int = 0
) -> tuple[int, float]:
    """logits: [V] float32 -> (token id, its log-probability under the unmodified distribution).

    ``index`` is which generated token this is: while it is within ``params.forced_token_ids``,
    the forced token is returned (teacher forcing).
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    if index < len(params.forced_token_ids):
        tok = params.forced_token_ids[index]
        return tok, float(logprobs[tok])
    if params.greedy:
        tok = _argmax(logits)
        return tok, float(logprobs[tok])
    scaled = logits / max(params.temperature, MIN_TEMPERATURE)
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the token crossing top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(scaled, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
        tok = _argmax(logits)  # NaN or inf logits: no distribution to sample from
    else:
        tok = int(torch.multinomial(probs, 1, generator=generator))
    return tok, float(logprobs[tok])


def _argmax(logits: torch.Tensor) -> int:
    """The most likely token, ignoring NaN (a NaN would otherwise win ``argmax``)."""
    return int(torch.argmax(torch.nan_to_num(logits, nan=float("-inf"))))
