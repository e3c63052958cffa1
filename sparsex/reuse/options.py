"""Reuse methods, each with its own option type, and a request's resolved reuse (pure Python).

    ReuseOptions = method name + that method's options (MethodOptions subclass) + CachePolicy

    MethodOptions            none, prefix, naive        (no knobs)
    ├─ EpicOptions           epic                       epic_tokens
    └─ BudgetOptions         (budget)
       ├─ CacheBlendOptions  cacheblend                 check_layer, filter_layers, filter_start
       ├─ CheckOptions       cacheblend-simple          check_layer
       └─ RepairOptions      (overflow, tail, sinks)
          ├─ SparsexOptions  sparsex                    boundary, hybrid
          └─ BlendOptions    blend (the default)        check_layer, narrow_layer, candidates, shift*

Clients give options as one flat dict (``reuse={"method": "blend", "budget": 0.15, "namespace":
"t1"}``); :func:`resolve_reuse` sorts them into the cache policy and the method's options (an
option of another method is ignored; an unknown name is an error). Family defaults (``None`` fields) are in the tables
below; ``docs/REUSE.md`` says what each method does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from sparsex.kv.policy import POLICY_FIELDS, CachePolicy

SHIFT_SOURCES = ("all", "selected")
"""blend's ``shift_sources``: the running tokens a segment's shift is measured on."""


@dataclass(frozen=True)
class MethodOptions:
    """A method's own options; the base class is a method with none (``none``, ``prefix``, ``naive``)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "int | None") and value is not None and (isinstance(value, bool) or value < 0):
                raise ValueError(f"{f.name} must be an int >= 0, got {value!r}")


@dataclass(frozen=True)
class EpicOptions(MethodOptions):
    """epic_tokens: leading tokens recomputed per reused segment (EPIC / LegoLink)."""

    epic_tokens: int = 16


@dataclass(frozen=True)
class BudgetOptions(MethodOptions):
    """budget: fraction of reused tokens to recompute (the top-k size), in [0, 1]; None = the
    model family's default (:data:`DEFAULT_BUDGET`)."""

    budget: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is not None and not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"budget must be in [0, 1], got {self.budget}")


@dataclass(frozen=True)
class CheckOptions(BudgetOptions):
    """cacheblend-simple: dense through ``check_layer``, then the top tokens by K deviation there."""

    check_layer: int = 1


@dataclass(frozen=True)
class CacheBlendOptions(CheckOptions):
    """cacheblend, as published: dense through ``check_layer``, where ``filter_start`` x the budget
    are kept by K deviation; over the next ``filter_layers`` layers each keeps the top of the
    previous set by its own K deviation, shrinking linearly to the budget (0 = one selection)."""

    filter_layers: int = 3
    filter_start: float = 1.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.filter_start < 1.0:
            raise ValueError(f"filter_start must be >= 1 (a multiple of the budget), got {self.filter_start}")


@dataclass(frozen=True)
class RepairOptions(BudgetOptions):
    """What sparsex and blend recompute besides their selection.

    overflow_blocks: KV blocks added next to every non-reused run.
    overflow_before: also take the blocks *before* each non-reused run; None = the method's default
        (True for sparsex, as the paper does; False for blend: those tokens never see the new text).
    tail_tokens: tokens added from a reused segment the prompt ends in.
    sink_tokens: reused tokens whose KV was computed at a position below this (the first tokens of
        the prompt that cached them, where attention sinks form) are always recomputed; 0 = off.
    """

    overflow_blocks: int = 1
    overflow_before: bool | None = None
    tail_tokens: int = 64
    sink_tokens: int = 0


@dataclass(frozen=True)
class SparsexOptions(RepairOptions):
    """The paper's method: Sparse-Q selection at ``boundary`` (ℓ*: a layer index, or a fraction of
    depth in [0, 1); None = the family default) with layers 0..ℓ* dense (``hybrid``), or at layer 0."""

    boundary: int | float | None = None
    hybrid: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.boundary, float) and not 0.0 <= self.boundary < 1.0:
            raise ValueError(f"a fractional boundary must be in [0, 1), got {self.boundary}")
        if isinstance(self.boundary, int) and not isinstance(self.boundary, bool) and self.boundary < 0:
            raise ValueError(f"boundary layer must be >= 0, got {self.boundary}")


@dataclass(frozen=True)
class BlendOptions(RepairOptions):
    """Ours (the default), see docs/REUSE.md.

    check_layer: the probed layer (dense before it): its K+V deviation picks the candidates.
    narrow_layer: 0 (or <= check_layer) = one selection; else the candidates run layers
        ``check_layer..narrow_layer``, where K+V deviation plus the new tokens' attention (Sparse-Q)
        keep the budget (the dropped candidates' KV is put back). None = the family default.
    candidates: the first stage's size, as a multiple of the budget.
    shift: weight of the segment shift (0 = off): in every layer after the final selection, the mean
        (fresh - cached) K/V difference over a segment's recomputed tokens, times ``shift``, is added
        to the cached K/V of its other tokens (this request's copy only). None = the family default.
    shift_v: the shift's weight for values (None = ``shift``).
    shift_shrink: shrink each segment's mean by ``m / (m + shift_shrink)``, ``m`` its running tokens.
    shift_sources: ``"all"`` running tokens of a segment, or ``"selected"`` (the overflow block and
        the tail left out of the mean).
    """

    check_layer: int = 1
    narrow_layer: int | None = None
    candidates: float = 6.0
    shift: float | None = None
    shift_v: float | None = None
    shift_shrink: float = 0.0
    shift_sources: str = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("shift", "shift_v"):
            w = getattr(self, name)
            if w is not None and not 0.0 <= w <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {w}")
        if self.shift_shrink < 0:
            raise ValueError(f"shift_shrink must be >= 0, got {self.shift_shrink}")
        if self.shift_sources not in SHIFT_SOURCES:
            raise ValueError(f"shift_sources must be one of {', '.join(SHIFT_SOURCES)}, got {self.shift_sources!r}")
        if self.candidates < 1.0:
            raise ValueError(f"candidates must be >= 1 (a multiple of the budget), got {self.candidates}")


METHOD_OPTIONS: dict[str, type[MethodOptions]] = {
    "none": MethodOptions, "prefix": MethodOptions, "naive": MethodOptions, "epic": EpicOptions,
    "cacheblend": CacheBlendOptions, "cacheblend-simple": CheckOptions, "sparsex": SparsexOptions,
    "blend": BlendOptions,
}
"""The built-in methods and their option types. The evaluation lab adds analysis-only ones
(``oracle``) to an engine it builds (``LLM(planners=...)``); the server serves only these."""
METHODS = tuple(METHOD_OPTIONS)


@dataclass(frozen=True)
class ReuseOptions:
    """How a request may reuse cached KV: the method, its options, and the cache policy."""

    method: str = "blend"
    params: MethodOptions = field(default_factory=BlendOptions)
    cache: CachePolicy = field(default_factory=CachePolicy)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"reuse method must be a method name, got {self.method!r}")

    @property
    def namespace(self) -> str:
        return self.cache.namespace

    @property
    def reuses_segments(self) -> bool:
        return self.method not in ("none", "prefix")

    @property
    def uses_prefix(self) -> bool:
        return self.method != "none"

    def as_dict(self) -> dict[str, Any]:
        """The flat form clients write: ``{"method": ..., **options, **cache policy}``."""
        out: dict[str, Any] = {"method": self.method}
        out.update({f.name: getattr(self.params, f.name) for f in fields(self.params)})
        out.update({f.name: getattr(self.cache, f.name) for f in fields(self.cache)})
        return out


def resolve_reuse(
    base: ReuseOptions, reuse: str | ReuseOptions | Mapping[str, Any] | None,
    methods: Mapping[str, type[MethodOptions]] = METHOD_OPTIONS,
) -> ReuseOptions:
    """A request's reuse: ``base`` (the engine's), a method name, a full ReuseOptions, or a flat dict
    of overrides (``None`` values mean "the default"). Options of ``base``'s method carry over to
    another method where it has them too (a budget); an option of another method is ignored (a
    budget given to ``prefix``), a name no method knows is an error. ``methods``: what the engine
    can run, with their option types."""
    if reuse is None:
        opts = base
    elif isinstance(reuse, ReuseOptions):
        opts = reuse
    elif isinstance(reuse, str):
        opts = _build(base, {"method": reuse}, methods)
    elif isinstance(reuse, Mapping):
        opts = _build(base, {k: v for k, v in reuse.items() if v is not None}, methods)
    else:
        raise TypeError(f"reuse must be a method name, ReuseOptions or dict, got {type(reuse).__name__}")
    if opts.method not in methods:
        raise ValueError(f"unknown reuse method {opts.method!r}; choose one of {', '.join(methods)}")
    if not isinstance(opts.params, methods[opts.method]):
        raise TypeError(f"{opts.method} takes {methods[opts.method].__name__}, got {type(opts.params).__name__}")
    return opts


def _build(base: ReuseOptions, given: dict[str, Any], methods: Mapping[str, type[MethodOptions]]) -> ReuseOptions:
    method = given.pop("method", base.method)
    if not isinstance(method, str) or method not in methods:
        raise ValueError(f"unknown reuse method {method!r}; choose one of {', '.join(methods)}")
    kind = methods[method]
    own = {f.name for f in fields(kind)}
    known = own | set(POLICY_FIELDS) | {f.name for k in methods.values() for f in fields(k)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown reuse option(s): {', '.join(unknown)}")
    carried = {f.name: getattr(base.params, f.name) for f in fields(kind) if hasattr(base.params, f.name)}
    params = kind(**{**carried, **{k: v for k, v in given.items() if k in own}})
    cache = replace(base.cache, **{k: v for k, v in given.items() if k in POLICY_FIELDS})
    return ReuseOptions(method, params, cache)


# ℓ* as a fraction of depth per family, chosen from the measurements in docs/REUSE.md.
DEFAULT_BOUNDARY = {"llama": 0.17, "gemma3": 0.17}

# blend's segment-shift weight per family, chosen from the sweeps in docs/REUSE.md.
DEFAULT_SHIFT = {"llama": 0.5, "gemma3": 0.3}

# The recompute budget per family (docs/REUSE.md); other families take the same.
DEFAULT_BUDGET = {"llama": 0.1, "gemma3": 0.1}

# blend's narrowing layer per family (docs/REUSE.md).
DEFAULT_NARROW = {"llama": 2, "gemma3": 2}


def budget_fraction(opts: BudgetOptions, family: str) -> float:
    """The recompute budget for ``family``: a fraction of the reused tokens."""
    return float(opts.budget if opts.budget is not None else DEFAULT_BUDGET.get(family, 0.1))


def narrow_layer(opts: BlendOptions, family: str) -> int:
    """blend's narrowing layer for ``family`` (0 = one selection stage)."""
    return int(opts.narrow_layer if opts.narrow_layer is not None else DEFAULT_NARROW.get(family, 2))


def shift_weight(opts: BlendOptions, family: str) -> float:
    """The segment shift's weight for ``family`` (0 = off)."""
    return float(opts.shift if opts.shift is not None else DEFAULT_SHIFT.get(family, 0.5))


def boundary_layer(opts: SparsexOptions, num_layers: int, family: str) -> int:
    """ℓ* as a layer index for a model with ``num_layers`` layers."""
    b = opts.boundary if opts.boundary is not None else DEFAULT_BOUNDARY.get(family, 0.17)
    layer = int(round(b * num_layers)) if isinstance(b, float) else int(b)
    return max(0, min(layer, num_layers - 1))
