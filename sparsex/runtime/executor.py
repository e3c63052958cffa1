"""Run a recompute plan: one forward pass, dense in early layers, sparse (the recompute set) after.

    layers   0 .. dense_layers-1      select_layer       .. stage 1 .. stage m       .. L-1
    tokens   every prompt token   ->  probe / capture -> S0 ⊇ S1 ⊇ ... ⊇ S_m = recompute set R

Each narrowing stage runs its layer for the current set, then keeps a subset for the layers after
it (CacheBlend's gradual filtering is several stages; ``blend``'s second selection is one).

A ``RecomputePlan`` is immutable data built by ``sparsex.reuse.planner``; ``run_plan`` executes it
and returns a ``PlanRun`` saying what it ran. Selection happens through the plan's selectors (pure
functions of the selection layer's attention inputs, ``SelectionInputs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsex.kv.paged import KVCache
from sparsex.models.base import SeqSlice, StepContext
from sparsex.runtime.model_runner import ModelRunner, SeqInput


@dataclass(frozen=True)
class SelectionInputs:
    """The selection layer's attention inputs over the whole sequence (positions 0..T-1).

    layer: the layer index.
    positions: [N] positions whose queries are in ``q`` (the tokens active at that layer).
    q: [N, Hq, D] their rotated queries.
    k_cached, v_cached: [T, Hkv, D] the request's KV before this layer's fresh values were written
        (aligned cached KV at reused positions).
    k_fresh, v_fresh: [T, Hkv, D] the same with fresh values at the active positions.
    """

    layer: int
    positions: torch.Tensor
    q: torch.Tensor
    k_cached: torch.Tensor
    v_cached: torch.Tensor
    k_fresh: torch.Tensor
    v_fresh: torch.Tensor


Selector = Callable[[SelectionInputs], torch.Tensor]
KVAdjust = Callable[[int, SeqSlice, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class NarrowStage:
    """After ``layer`` has run for the current set, ``select`` returns the tokens that go on (the
    executor keeps the current set's members among them; the last position must stay)."""

    layer: int
    select: Selector


@dataclass(frozen=True)
class RecomputePlan:
    """A prefill whose later layers run only on a recompute set.

    seq: all prompt tokens after the exact prefix (positions ``P..T-1``), with the block table.
    dense_layers: layers [0, dense_layers) run for every position in ``seq`` (their fresh KV is written).
    recompute: positions that run in the remaining layers (used when ``select`` is None), and
        the probe set run up to ``select_layer`` when ``select`` is given with ``dense_layers == 0``.
    select: returns the recompute set from the selection layer's inputs; must contain the last position.
    select_layer: the layer whose attention inputs feed ``select``.
    probe: True: only project Q/K/V at ``select_layer`` (== dense_layers) for every token, writing
        nothing, then run that layer sparsely; False: ``select_layer`` runs (densely or for the
        probe set) and its fresh KV is written before selecting.
    restore: positions whose KV in dense layers ``1..dense_layers-1`` is put back to what it was
        before the pass unless they are selected (keeps unselected reused tokens' KV consistent
        across layers: stale throughout rather than fresh below and stale above). Layer 0 needs no
        restore: its KV depends on the token and position only.
    stages: narrowing stages at strictly increasing layers, each >= ``dense_layers`` (and after
        ``select_layer``): after the stage's layer has run for the current set, its selector keeps
        the subset that runs the following layers. With ``restore``, the dropped tokens' KV in
        layers ``1..stage layer`` is put back.
    adjust: called before each layer from ``adjust_from`` on writes the running tokens' fresh K/V
        (``StepContext.before_write``): it may correct the cached KV of the tokens that do not run.
    """

    seq: SeqInput
    dense_layers: int
    recompute: torch.Tensor
    select: Selector | None = None
    select_layer: int = 0
    probe: bool = False
    restore: torch.Tensor | None = None
    stages: tuple[NarrowStage, ...] = ()
    adjust: KVAdjust | None = None
    adjust_from: int = 0

    def __post_init__(self) -> None:
        layers = [st.layer for st in self.stages]
        if layers != sorted(set(layers)) or (layers and layers[0] < max(self.dense_layers, self.select_layer + 1)):
            raise ValueError(f"narrowing stages must be at increasing layers after the selection, got {layers}")
        if layers and self.dense_layers == 0 and not self.probe:
            raise ValueError("narrowing stages need a dense layer or a probe before them")


@dataclass(frozen=True)
class PlanRun:
    """What ``run_plan`` ran.

    logits: [V] float32 logits of the last prompt position.
    recomputed: positions that ran the last layer (the final recompute set), ascending.
    stage_sizes: with narrowing stages, the size of the set that ran up to each stage's layer
        (S0 from ``dense_layers`` through stage 1's layer, S1 from there through stage 2's, ...);
        empty without stages.
    """

    logits: torch.Tensor
    recomputed: torch.Tensor
    stage_sizes: tuple[int, ...] = ()


def run_plan(runner: ModelRunner, plan: RecomputePlan) -> PlanRun:
    """Run ``plan`` in one forward pass over the runner's model and KV."""
    run = PlanExecution(runner, plan).advance(None)
    assert run is not None
    return run


class _Pass:
    """Per-pass helpers: contexts for an active set, and selection inputs from the KV."""

    def __init__(self, runner: ModelRunner, plan: RecomputePlan) -> None:
        self.model, self.kv, self.dev, self.plan = runner.model, runner.kv, runner.device, plan
        s = plan.seq
        self.start = s.positions[0]
        self.tokens = torch.tensor(s.token_ids, dtype=torch.int64, device=self.dev)
        self.read = self.kv.reader(s.block_table, s.ctx_len, self.dev)
        # slots and RoPE rotations of the active set, kept while the set stays the same
        self._pos: torch.Tensor | None = None
        self._slots = torch.empty(0, dtype=torch.int64)
        self._rotary: dict[int, torch.Tensor] = {}

    def context(self, pos: torch.Tensor, capture: int | None, layer: int = -1) -> StepContext:
        s, plan = self.plan.seq, self.plan
        if pos is not self._pos:
            self._pos, self._slots, self._rotary = pos, self.kv.slots(s.block_table, pos), {}
        sl = SeqSlice(0, pos.numel(), pos, self._slots, self.read, s.ctx_len)
        caps = frozenset() if capture is None else frozenset({capture})
        adjust = plan.adjust if layer >= plan.adjust_from else None
        return StepContext(seqs=[sl], positions=pos, kv=self.kv, capture_layers=caps, before_write=adjust,
                           rotary_cache=self._rotary)

    def select_captured(self, selector: Selector, i: int, step: StepContext) -> torch.Tensor:
        q, kc, vc = step.captured[i][0]
        kf, vf = self.kv.read(i, self.read)
        return selector(SelectionInputs(i, step.positions, q, kc, vc, kf, vf)).to(self.dev)

    def select_probe(self, selector: Selector, i: int, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Project Q/K/V of layer ``i`` for every active token without writing, then select."""
        q, k, v = self.model.qkv(i, x, self.context(pos, None))
        kc, vc = (t.clone() for t in self.kv.read(i, self.read))
        kf, vf = kc.clone(), vc.clone()
        kf[pos], vf[pos] = k.to(kf.dtype), v.to(vf.dtype)
        return selector(SelectionInputs(i, pos, q, kc, vc, kf, vf)).to(self.dev)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(x[-1:]).float()[0]


class PlanExecution:
    """A plan being run, one layer at a time, resumable between engine steps.

    ``advance(budget)`` runs layers until about ``budget`` token-layers have run (at least one
    layer per call), so a long reuse prefill yields to other requests like a chunked full prefill
    does; between calls the state is the next layer, the active tokens and their hidden states.
    Layers run in order, each for its active set:

        dense (or probe) first:  layers < dense_layers for every token, then the selected set,
                                 narrowed at each stage
        sparse with a selection: the selection layer and those below it for the initial set (a
                                 first pass, run on the first call), then every layer for the set

    Invariant: layers ``< self.layer`` hold their final KV for the active tokens (and, for dense
    layers, every token); nothing else reads this request's blocks meanwhile.
    """

    def __init__(self, runner: ModelRunner, plan: RecomputePlan) -> None:
        self.plan, self.ps = plan, _Pass(runner, plan)
        self.num_layers = self.ps.model.spec.num_layers
        self.dense_first = plan.dense_layers > 0 or plan.probe
        self.stages = {st.layer: st for st in plan.stages}
        self.sizes: list[int] = []
        self.chosen = plan.recompute
        self.layer = 0
        self.first_pass = not self.dense_first and plan.select is not None  # sparse: select first
        with torch.inference_mode():
            self.saved = _save_restore_kv(runner.kv, plan) if self.dense_first else []
            everything = torch.arange(self.ps.start, plan.seq.ctx_len, device=self.ps.dev)
            self.active = everything if self.dense_first else self.chosen
            self.x = self.ps.model.embed(self.ps.tokens[self.active - self.ps.start])

    @property
    def remaining_work(self) -> float:
        """Token-layers still to run, estimated with the current active set for sparse layers."""
        n, later = len(self.plan.seq.token_ids), range(self.layer, self.num_layers)
        return float(sum(n if i < self.plan.dense_layers else int(self.active.numel()) for i in later))

    def advance(self, budget: float | None) -> PlanRun | None:
        """Run layers until ``budget`` token-layers are spent (None: to the end); the run once done."""
        spent = 0.0
        with torch.inference_mode():
            if self.first_pass:
                spent += self._select_first()
            while self.layer < self.num_layers:
                cost = float(self.active.numel() if self.layer != self.plan.dense_layers else self.chosen.numel())
                if budget is not None and spent > 0 and spent + cost > budget:
                    return None
                self._run_layer(self.layer)
                self.layer += 1
                spent += cost
            return PlanRun(self.ps.logits(self.x), self.active, tuple(self.sizes))

    def _select_first(self) -> float:
        """The sparse plan's first pass: its selection layer (and those below) for the initial set."""
        ps, plan = self.ps, self.plan
        assert plan.select is not None
        x = self.x
        for i in range(plan.select_layer + 1):
            step = ps.context(self.chosen, i if i == plan.select_layer else None)
            x = ps.model.layer_forward(i, x, step)
        work = float((plan.select_layer + 1) * self.chosen.numel())
        self.chosen = self.active = ps.select_captured(plan.select, plan.select_layer, step)
        self.x = ps.model.embed(ps.tokens[self.chosen - ps.start])
        self.first_pass = False
        return work

    def _run_layer(self, i: int) -> None:
        ps, plan, kv = self.ps, self.plan, self.ps.kv
        if self.dense_first:
            if plan.probe and i == plan.select_layer:
                assert plan.select is not None
                self.chosen = ps.select_probe(plan.select, i, self.x, self.active)
            if i == plan.dense_layers:
                self.x, self.active = self.x[self.chosen - ps.start], self.chosen
                if self.saved and plan.restore is not None and not self.stages:
                    _restore(kv, plan.seq.block_table, plan.restore, self.chosen, self.saved)
        stage = self.stages.get(i)
        select_here = self.dense_first and plan.select is not None and not plan.probe and i == plan.select_layer
        step = ps.context(self.active, i if select_here or stage else None, i)
        self.x = ps.model.layer_forward(i, self.x, step)
        if select_here:
            assert plan.select is not None
            self.chosen = ps.select_captured(plan.select, i, step)
        elif stage is not None:
            self.sizes.append(int(self.active.numel()))
            keep = torch.isin(self.active, ps.select_captured(stage.select, i, step))
            self.x, self.active = self.x[keep], self.active[keep]
            if self.saved and plan.restore is not None:
                _restore(kv, plan.seq.block_table, plan.restore, self.active, self.saved)


def _save_restore_kv(kv: KVCache, plan: RecomputePlan) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """The KV of ``plan.restore`` in layers 1.. that may be overwritten before the final selection."""
    if plan.restore is None or not plan.restore.numel():
        return []
    slots = kv.slots(plan.seq.block_table, plan.restore.to(kv.k.device))
    last = plan.stages[-1].layer + 1 if plan.stages else plan.dense_layers
    saved = []
    for i in range(1, last):
        k_old, v_old = kv.read(i, slots)
        saved.append((i, k_old.clone(), v_old.clone()))
    return saved


def _restore(
    kv: KVCache, table: list[int], positions: torch.Tensor, chosen: torch.Tensor,
    saved: list[tuple[int, torch.Tensor, torch.Tensor]],
) -> None:
    """Write back the saved KV of ``positions`` that were not ``chosen``."""
    keep = ~torch.isin(positions, chosen.to(positions.device))
    if not bool(keep.any()):
        return
    slots = kv.slots(table, positions[keep].to(kv.k.device))
    keep = keep.to(kv.k.device)
    for i, k_old, v_old in saved:
        kv.write(i, slots, k_old[keep], v_old[keep])


def compute_fraction(plan: RecomputePlan, run: PlanRun, num_layers: int, prompt_len: int) -> float:
    """Fraction of a full prefill's per-layer token work actually done (a dense layer counts in full).

    A probe (Q/K/V projections of every token at one layer) is counted as a quarter layer, about
    the share of a layer's FLOPs its projections take in these models.
    """
    ran, recomputed = len(plan.seq.token_ids), int(run.recomputed.numel())
    work: float = plan.dense_layers * ran + (num_layers - plan.dense_layers) * recomputed
    start = plan.dense_layers
    for stage, size in zip(plan.stages, run.stage_sizes, strict=True):  # the larger sets before each stage
        work += (stage.layer + 1 - start) * (size - recomputed)
        start = stage.layer + 1
    if plan.probe:
        work += 0.25 * ran
    elif plan.dense_layers == 0 and plan.select is not None:
        work += plan.recompute.numel() * (plan.select_layer + 1)  # the layer-0 pass of the probe set
    return work / (num_layers * prompt_len)
