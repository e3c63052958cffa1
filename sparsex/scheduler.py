"""Scheduler: decides what each engine step runs (pure Python, no torch).

Policy: admit the first waiting request (prefill) when the KV manager can find its cache hits and
hold its whole prompt and ``max_tokens`` beside what running requests reserved; otherwise decode
every running request in one batch. Admission reserves the blocks a request may still need, so a
running request never runs out of KV and no preemption is needed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from sparsex.kv_manager import Admission
from sparsex.request import Request, RequestStatus


class Admitter(Protocol):
    """Decides cache hits and reserves blocks in one step (``sparsex.kv_manager.KVCacheManager``)."""

    @property
    def block_size(self) -> int: ...

    def admit(self, req: Request, reserved_blocks: int) -> Admission | None: ...


@dataclass
class SchedulerOutput:
    """prefill: a request to prefill this step (alone) with its admission, or None;
    decode: requests to decode together."""

    prefill: Request | None = None
    admission: Admission | None = None
    decode: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(self, manager: Admitter, max_num_seqs: int = 64) -> None:
        self.manager = manager
        self.block_size = manager.block_size
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

    def schedule(self) -> SchedulerOutput:
        if self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            adm = self.manager.admit(req, self.reserved_blocks())
            if adm is not None:
                self.waiting.popleft()
                req.status = RequestStatus.RUNNING
                req.num_reserved_blocks = req.blocks_needed(self.block_size)
                req.block_table = list(adm.block_table)
                self.running[req.request_id] = req
                return SchedulerOutput(prefill=req, admission=adm)
        decode = [r for r in self.running.values() if r.output_token_ids and not r.finished]
        return SchedulerOutput(decode=decode)

    def finish(self, req: Request) -> None:
        req.status = RequestStatus.FINISHED
        self.running.pop(req.request_id, None)
        try:
            self.waiting.remove(req)
        except ValueError:
            pass
