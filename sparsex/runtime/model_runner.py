"""Model runner: turns per-sequence inputs into one flat forward step and runs the layer loop.

The hot path reads as: prepare inputs -> run layers -> logits of each sequence's last token.
A prefill that recomputes only part of the prompt is run by ``sparsex.runtime.executor``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from sparsex.kv.paged import KVCache
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

    @torch.inference_mode()
    def layer_inputs(self, seq: SeqInput, layers: Collection[int]) -> dict[int, torch.Tensor]:
        """Run every layer for one sequence (writing its KV, as ``forward``) and return the hidden
        states entering each of ``layers``: layer -> [n, H] float32 on the CPU (for analysis)."""
        token_ids, step = self.prepare([seq])
        x = self.model.embed(token_ids)
        out: dict[int, torch.Tensor] = {}
        for i in range(self.model.spec.num_layers):
            if i in layers:
                out[i] = x.float().cpu()
            x = self.model.layer_forward(i, x, step)
        return out

