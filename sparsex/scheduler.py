"""Scheduler: decides what each engine step runs (pure Python, no torch).

Policy: admit a waiting request (prefill) when the pool can hold its whole prompt and
``max_tokens``; otherwise decode every running request in one batch. Admission reserves
the blocks a request may still need, so a running request never runs out of KV and no
preemption is needed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from sparsex.request import Request, RequestStatus


class FreeBlockCounter(Protocol):
    @property
    def num_free_blocks(self) -> int: ...


@dataclass
class SchedulerOutput:
    """prefill: a request to prefill this step (alone), or None; decode: requests to decode together."""

    prefill: Request | None = None
    decode: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(self, pool: FreeBlockCounter, block_size: int, max_num_seqs: int = 64) -> None:
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def reserved_blocks(self) -> int:
        """Blocks running requests may still allocate."""
        return sum(max(0, r.num_reserved_blocks - len(r.block_table)) for r in self.running.values())

    def can_admit(self, req: Request) -> bool:
        need = req.blocks_needed(self.block_size)
        return need <= self.pool.num_free_blocks - self.reserved_blocks()

    def schedule(self) -> SchedulerOutput:
        if self.waiting and len(self.running) < self.max_num_seqs and self.can_admit(self.waiting[0]):
            req = self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.num_reserved_blocks = req.blocks_needed(self.block_size)
            self.running[req.request_id] = req
            return SchedulerOutput(prefill=req)
        decode = [r for r in self.running.values() if r.output_token_ids and not r.finished]
        return SchedulerOutput(decode=decode)

    def finish(self, req: Request) -> None:
        req.status = RequestStatus.FINISHED
        self.running.pop(req.request_id, None)
        try:
            self.waiting.remove(req)
        except ValueError:
            pass
