"""Sampling parameters of a request (pure Python, validated on construction)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIN_TEMPERATURE = 1e-2
"""The smallest temperature other than 0 (greedy). Below it, ``logits / temperature`` overflows
float32 (1e-40 did); and a temperature that small samples the argmax anyway."""


@dataclass
class SamplingParams:
    """How to pick tokens after the prompt.

    max_tokens: number of tokens to generate at most.
    temperature: 0 means greedy; otherwise at least ``MIN_TEMPERATURE`` (a finite number).
    top_p: nucleus sampling mass in (0, 1].
    top_k: keep only the k most likely tokens (0 = no limit).
    seed: per-request random seed for reproducible sampling (None = nondeterministic).
    stop: strings that end generation; they are not included in the text.
    stop_token_ids: token ids that end generation (in addition to the model's EOS).
    ignore_eos: keep generating past the model's end-of-sequence tokens.
    logprobs: return the log-probability of each generated token.
    forced_token_ids: teacher forcing (analysis): generated token ``i`` is ``forced_token_ids[i]``
        whatever the logits say (its log-probability is still the model's); sampling resumes after
        them. The evaluation lab feeds a reference's tokens back this way.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    forced_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or not (
            self.temperature == 0.0 or self.temperature >= MIN_TEMPERATURE
        ):
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, "
                             f"got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:  # also refuses NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not isinstance(t, int) or t < 0 for t in self.forced_token_ids):
            raise ValueError("forced_token_ids must be non-negative token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
