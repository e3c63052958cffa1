"""Model runner: turns per-sequence inputs into one flat forward step and runs the layer loop.

The hot path reads as: prepare inputs -> run layers -> logits of each sequence's last token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsex.kv_cache import KVCache
from sparsex.models.base import CausalLM, SeqSlice, StepContext


@dataclass
class SeqInput:
    """One sequence's tokens to compute in a step.

    token_ids: the tokens to run (new prompt tokens, or the last sampled token when decoding).
    positions: their absolute positions, ascending.
    block_table: the sequence's KV blocks in position order (covering ``ctx_len``).
    ctx_len: KV length visible after this step (the last position + 1).
    """

    token_ids: list[int]
    positions: list[int]
    block_table: list[int]
    ctx_len: int


class ModelRunner:
    """Owns the model and its paged KV storage; stateless across steps otherwise."""

    def __init__(self, model: CausalLM, kv: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.device = device

    def prepare(self, seqs: list[SeqInput]) -> tuple[torch.Tensor, StepContext]:
        ids: list[int] = []
        pos: list[int] = []
        slices: list[SeqSlice] = []
        for s in seqs:
            start = len(ids)
            ids.extend(s.token_ids)
            pos.extend(s.positions)
            p = torch.tensor(s.positions, dtype=torch.int64, device=self.device)
            slices.append(
                SeqSlice(
                    start=start,
                    end=len(ids),
                    positions=p,
                    slots=self.kv.slots(s.block_table, p),
                    read=self.kv.reader(s.block_table, s.ctx_len, self.device),
                    ctx_len=s.ctx_len,
                )
            )
        positions = torch.tensor(pos, dtype=torch.int64, device=self.device)
        token_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        return token_ids, StepContext(seqs=slices, positions=positions, kv=self.kv)

    @torch.inference_mode()
    def forward(self, seqs: list[SeqInput], all_logits: bool = False) -> torch.Tensor:
        """Run all layers for ``seqs``.

        Returns [B, V] float32 logits of each sequence's last token, or [N, V] for every active
        token when ``all_logits`` (for parity tests and evaluation).
        """
        token_ids, step = self.prepare(seqs)
        x = self.model.embed(token_ids)  # [N, H]
        for i in range(self.model.spec.num_layers):
            x = self.model.layer_forward(i, x, step)
        if all_logits:
            return self.model.compute_logits(x).float()
        last = torch.tensor([s.end - 1 for s in step.seqs], device=self.device)
        return self.model.compute_logits(x[last]).float()  # [B, V]


@dataclass
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


@dataclass
class PlannedPrefill:
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
    narrow: a second selection (``probe`` plans only): after layer ``narrow_layer`` (> dense_layers)
        has run for the first selection, returns the subset that runs the remaining layers. With
        ``restore``, the dropped tokens' KV in layers ``1..narrow_layer`` is put back.
    num_candidates: set by the runner: how many positions ran layers ``dense_layers..narrow_layer``.
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
    narrow: Selector | None = None
    narrow_layer: int = 0
    num_candidates: int = 0
    adjust: Callable[[int, SeqSlice, torch.Tensor, torch.Tensor], None] | None = None
    adjust_from: int = 0


def _planned_forward(runner: ModelRunner, plan: PlannedPrefill) -> tuple[torch.Tensor, torch.Tensor]:
    model, kv, dev = runner.model, runner.kv, runner.device
    s = plan.seq
    start = s.positions[0]
    tokens = torch.tensor(s.token_ids, dtype=torch.int64, device=dev)
    read = kv.reader(s.block_table, s.ctx_len, dev)

    def context(pos: torch.Tensor, capture: int | None, layer: int = -1) -> StepContext:
        sl = SeqSlice(0, pos.numel(), pos, kv.slots(s.block_table, pos), read, s.ctx_len)
        caps = frozenset() if capture is None else frozenset({capture})
        adjust = plan.adjust if layer >= plan.adjust_from else None
        return StepContext(seqs=[sl], positions=pos, kv=kv, capture_layers=caps, before_write=adjust)

    def probe(i: int, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        assert plan.select is not None
        q, k, v = model.qkv(i, x, context(pos, None))
        kc, vc = (t.clone() for t in kv.read(i, read))
        kf, vf = kc.clone(), vc.clone()
        kf[pos], vf[pos] = k.to(kf.dtype), v.to(vf.dtype)
        return plan.select(SelectionInputs(i, pos, q, kc, vc, kf, vf)).to(dev)

    def captured(i: int, step: StepContext) -> torch.Tensor:
        assert plan.select is not None
        q, kc, vc = step.captured[i][0]
        kf, vf = kv.read(i, read)
        return plan.select(SelectionInputs(i, step.positions, q, kc, vc, kf, vf)).to(dev)

    num_layers = model.spec.num_layers
    chosen = plan.recompute
    saved: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    narrowing = plan.narrow is not None and plan.probe and plan.narrow_layer > plan.dense_layers
    if plan.restore is not None and plan.restore.numel():
        slots = kv.slots(s.block_table, plan.restore.to(dev))
        for i in range(1, plan.narrow_layer + 1 if narrowing else plan.dense_layers):
            k_old, v_old = kv.read(i, slots)
            saved.append((i, k_old.clone(), v_old.clone()))
    if plan.dense_layers > 0 or plan.probe:
        active = torch.arange(start, s.ctx_len, device=dev)
        x = model.embed(tokens)
        for i in range(num_layers):
            if plan.probe and i == plan.select_layer:
                chosen = probe(i, x, active)
            if i == plan.dense_layers:
                x, active = x[chosen - start], chosen
                plan.num_candidates = int(chosen.numel())
                if saved and plan.restore is not None and not narrowing:
                    _restore(kv, s.block_table, plan.restore, chosen, saved)
            narrow_here = narrowing and i == plan.narrow_layer
            select_here = plan.select is not None and not plan.probe and i == plan.select_layer
            cap = i if select_here or narrow_here else None
            step = context(active, cap, i)
            x = model.layer_forward(i, x, step)
            if select_here:
                chosen = captured(i, step)
            elif narrow_here:
                assert plan.narrow is not None
                q, kc, vc = step.captured[i][0]
                kf, vf = kv.read(i, read)
                final = plan.narrow(SelectionInputs(i, active, q, kc, vc, kf, vf)).to(dev)
                keep = torch.isin(active, final)
                x, active = x[keep], active[keep]
                if saved and plan.restore is not None:
                    _restore(kv, s.block_table, plan.restore, active, saved)
        return model.compute_logits(x[-1:]).float()[0], active
    if plan.select is not None:  # run the select layer for the initial set only, then choose
        x = model.embed(tokens[chosen - start])
        for i in range(plan.select_layer + 1):
            step = context(chosen, i if i == plan.select_layer else None)
            x = model.layer_forward(i, x, step)
        chosen = captured(plan.select_layer, step)
    x = model.embed(tokens[chosen - start])
    for i in range(num_layers):
        x = model.layer_forward(i, x, context(chosen, None, i))
    return model.compute_logits(x[-1:]).float()[0], chosen


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


def run_planned(runner: ModelRunner, plan: PlannedPrefill) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a planned prefill; returns (logits [V] of the last position, recomputed positions)."""
    with torch.inference_mode():
        return _planned_forward(runner, plan)
