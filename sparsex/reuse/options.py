"""Reuse methods and their options (pure Python)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

METHODS = ("none", "prefix", "naive", "epic", "cacheblend", "cacheblend-simple", "sparsex", "blend")
"""The built-in methods. The evaluation lab adds analysis-only ones (``oracle``) to an engine it
builds (``LLM(planners=...)``); the server serves only these."""
SERVING_METHODS = METHODS
"""What the server offers: the built-in methods, never an analysis-only one."""
SHIFT_SOURCES = ("all", "selected")
"""blend's ``shift_sources``: the running tokens a segment's shift is measured on."""


@dataclass(frozen=True)
class ReuseOptions:
    """How a request may reuse cached KV and which tokens it recomputes.

    method: one of METHODS (see docs/REUSE.md):
        none: full prefill. prefix: exact prefix cache only. naive: reuse every hit as is.
        epic: recompute the first ``epic_tokens`` of each reused segment.
        cacheblend: as published: dense through ``check_layer``, then top tokens by K deviation,
            filtered gradually over the next ``filter_layers`` layers down to the budget.
        cacheblend-simple: one selection at ``check_layer`` (no gradual filtering).
        sparsex: the paper's Sparse-Q selection at ``boundary`` (hybrid) or layer 0.
        blend: our default, see docs/REUSE.md.
        Any other name must be a method the engine was given (``LLM(planners=...)``).
    budget: fraction of reused tokens to recompute (the top-k size), in [0, 1]. None = the family
        default (0.1 for Llama and Gemma 3), see docs/REUSE.md.
    boundary: ℓ* as a layer index (int) or a fraction of depth (float in [0, 1)); None = family default.
    hybrid: sparsex only: layers 0..ℓ* dense (True) or select at layer 0 (False).
    overflow_blocks: KV blocks added on each side of every non-reused run (sparsex, blend).
    overflow_before: also take the blocks *before* each non-reused run. None = the method's default:
        True for sparsex (the paper does), False for blend (causally those tokens never see the
        new text; measured: same quality on RAG for 0.05 less cost, see docs/BENCHMARKS.md).
    tail_tokens: tokens added from a reused segment the prompt ends in (sparsex, blend).
    sink_tokens: sparsex, blend: reused tokens whose KV was computed at a position below this (the
        first tokens of the prompt that cached them, where attention sinks form) are always
        recomputed; 0 = off.
    epic_tokens: epic: leading tokens recomputed per reused segment.
    check_layer: cacheblend: layer at which K deviation is measured (dense through it); blend: the
        probed layer (dense before it).
    filter_layers: cacheblend: layers after ``check_layer`` over which the selection narrows (each
        keeps the top of the previous set by its own K deviation); 0 = one selection.
    filter_start: cacheblend: the check layer keeps this multiple of the budget; the stages shrink it
        linearly to the budget (the paper picks "slightly more" tokens at first).
    narrow_layer: blend: 0 (or <= check_layer) = off; else select in two stages: the probe at
        ``check_layer`` picks ``candidates`` x the budget by K+V deviation, layers
        ``check_layer..narrow_layer`` run for those candidates only, and K+V deviation plus the
        Sparse-Q mass at ``narrow_layer`` keeps the budget's top tokens (KV of the dropped
        candidates is put back). None = the family default (2 for Llama and Gemma 3), see docs/REUSE.md.
    candidates: blend with ``narrow_layer``: size of the first stage, as a multiple of the budget
        (6 since session 11: chosen on the tune split of both models, where 3 missed tokens that
        Gemma 3's agents need; on the report split level on SmolLM2 and ahead on Gemma 3, for
        0.01-0.03 more cost, see docs/BENCHMARKS.md).
    shift: blend: weight of the segment shift (0 = off): in every layer after the final selection,
        the mean difference between fresh and cached K/V over a segment's recomputed tokens, times
        ``shift``, is added to the cached K/V of the segment's other tokens (this request's copy
        only; keys compared without their rotation). None = the family default (Llama 0.5,
        Gemma 3 0.3), chosen by sweeps, see docs/REUSE.md.
    shift_v: blend: the shift's weight for values (None = ``shift``, so keys and values alike).
    shift_shrink: blend: shrink each segment's mean toward 0 by ``m / (m + shift_shrink)``, where
        ``m`` is how many of its tokens ran: a mean over few tokens is trusted less (0 = off, the
        default: on the report split it fixed chat but cost RAG and agents, see docs/REUSE.md).
    shift_sources: blend: which running tokens a segment's mean is taken over: ``"all"`` (the
        default) or ``"selected"`` (only those the deviation picked: the overflow block after new
        text and the tail do not count, so a segment that only runs its overflow gets no shift).
    namespace: tenant / cache salt; entries never cross namespaces.
    auto_segments: cut unannotated text into content-defined chunks that can be reused.
    register: publish freshly computed segments and prefix blocks into the cache: every piece of a
        segment that no reused run covers (a block or longer); reused KV is never published.
    register_after_reuse: also publish the pieces that come after a reused token (the default).
        Their tokens ran through every layer, over partly reused KV; without them a passage that
        overlaps an earlier one (neighbouring retrieved chunks) is never cached beyond the overlap.
        False publishes only what lies before the first reused token.
    """

    method: str = "blend"
    budget: float | None = None
    boundary: int | float | None = None
    hybrid: bool = True
    overflow_blocks: int = 1
    overflow_before: bool | None = None
    tail_tokens: int = 64
    sink_tokens: int = 0
    epic_tokens: int = 16
    check_layer: int = 1
    filter_layers: int = 3
    filter_start: float = 1.5
    narrow_layer: int | None = None
    candidates: float = 6.0
    shift: float | None = None
    shift_v: float | None = None
    shift_shrink: float = 0.0
    shift_sources: str = "all"
    namespace: str = ""
    auto_segments: bool = True
    register: bool = True
    register_after_reuse: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"reuse method must be a method name, got {self.method!r}")
        if self.budget is not None and not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"budget must be in [0, 1], got {self.budget}")
        if isinstance(self.boundary, float) and not 0.0 <= self.boundary < 1.0:
            raise ValueError(f"a fractional boundary must be in [0, 1), got {self.boundary}")
        if isinstance(self.boundary, int) and not isinstance(self.boundary, bool) and self.boundary < 0:
            raise ValueError(f"boundary layer must be >= 0, got {self.boundary}")
        for name in ("shift", "shift_v"):
            w = getattr(self, name)
            if w is not None and not 0.0 <= w <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {w}")
        if self.shift_shrink < 0:
            raise ValueError(f"shift_shrink must be >= 0, got {self.shift_shrink}")
        if self.shift_sources not in SHIFT_SOURCES:
            raise ValueError(f"shift_sources must be one of {', '.join(SHIFT_SOURCES)}, got {self.shift_sources!r}")
        if self.filter_start < 1.0:
            raise ValueError(f"filter_start must be >= 1 (a multiple of the budget), got {self.filter_start}")
        if self.candidates < 1.0:
            raise ValueError(f"candidates must be >= 1 (a multiple of the budget), got {self.candidates}")
        for name in ("overflow_blocks", "tail_tokens", "sink_tokens", "epic_tokens", "check_layer", "narrow_layer",
                     "filter_layers"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0")

    def with_updates(self, **kw: Any) -> ReuseOptions:
        """A copy with the given fields changed (None values are ignored)."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    @property
    def reuses_segments(self) -> bool:
        return self.method not in ("none", "prefix")

    @property
    def uses_prefix(self) -> bool:
        return self.method != "none"


# ℓ* as a fraction of depth per family, chosen from the measurements in docs/REUSE.md.
DEFAULT_BOUNDARY = {"llama": 0.17, "gemma3": 0.17}


# blend's segment-shift weight per family, chosen from the sweeps in docs/BENCHMARKS.md.
DEFAULT_SHIFT = {"llama": 0.5, "gemma3": 0.3}


# The recompute budget per family, from tune-split sweeps with the 16-token metric (docs/BENCHMARKS.md,
# issue #16): Llama 0.1 (with narrowing at layer 2 it keeps >= 80% of RAG's gap at <= 0.3 cost);
# Gemma 3 0.1 too (1-3 points below 0.15 for 0.06 less cost). Other families take the same.
DEFAULT_BUDGET = {"llama": 0.1, "gemma3": 0.1}


def budget_fraction(opts: ReuseOptions, family: str) -> float:
    """The recompute budget for ``family``: a fraction of the reused tokens."""
    return float(opts.budget if opts.budget is not None else DEFAULT_BUDGET.get(family, 0.1))


# blend's narrowing layer per family, from the same sweeps: Llama 2 (lifts RAG's 16-token gap closed
# from 73% to 82% against 3); Gemma 3 2 as well (level with 3, 0.01 cheaper).
DEFAULT_NARROW = {"llama": 2, "gemma3": 2}


def narrow_layer(opts: ReuseOptions, family: str) -> int:
    """blend's narrowing layer for ``family`` (0 = one selection stage)."""
    return int(opts.narrow_layer if opts.narrow_layer is not None else DEFAULT_NARROW.get(family, 2))


def shift_weight(opts: ReuseOptions, family: str) -> float:
    """The segment shift's weight for ``family`` (0 = off)."""
    return float(opts.shift if opts.shift is not None else DEFAULT_SHIFT.get(family, 0.5))


def boundary_layer(opts: ReuseOptions, num_layers: int, family: str) -> int:
    """ℓ* as a layer index for a model with ``num_layers`` layers."""
    b = opts.boundary if opts.boundary is not None else DEFAULT_BOUNDARY.get(family, 0.17)
    layer = int(round(b * num_layers)) if isinstance(b, float) else int(b)
    return max(0, min(layer, num_layers - 1))


def resolve_reuse(
    base: ReuseOptions, reuse: str | ReuseOptions | dict[str, Any] | None, methods: Collection[str] = METHODS
) -> ReuseOptions:
    """Per-request reuse options: a method name, a full ReuseOptions, or a dict of overrides.

    The method must be one of ``methods`` (the engine passes the ones it can run).
    """
    if reuse is None:
        opts = base
    elif isinstance(reuse, ReuseOptions):
        opts = reuse
    elif isinstance(reuse, str):
        opts = base.with_updates(method=reuse)
    elif isinstance(reuse, dict):
        unknown = set(reuse) - set(ReuseOptions.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown reuse option(s): {', '.join(sorted(unknown))}")
        opts = base.with_updates(**reuse)
    else:
        raise TypeError(f"reuse must be a method name, ReuseOptions or dict, got {type(reuse).__name__}")
    if opts.method not in methods:
        raise ValueError(f"unknown reuse method {opts.method!r}; choose one of {', '.join(methods)}")
    return opts
