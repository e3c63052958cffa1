"""Scheduler: decides what each engine step runs (pure Python, no torch).

    waiting ──admit──▶ prefilling ──prefill chunks──▶ running (decode batches) ──▶ finished
                        (hits + blocks, one step)      (followers join here)

Policy, per step:
- admit the first waiting request when the KV manager can find its cache hits and hold its whole
  prompt and ``max_tokens`` (and its followers': other choices of the same prompt) beside what
  admitted requests reserved; admission reserves every block a request may still need, so a
  running request never runs out of KV and no preemption is needed;
- then run either one prefill chunk, of the prefilling request with the fewest prompt tokens left
  (a short request admitted during a long prefill gets its first token after one chunk), or one
  decode batch of every running request; when both are waiting they alternate, so decoding never
  stalls behind a long prefill and a long prefill always progresses.
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

    def allocate_prompt(self, req: Request) -> list[int]: ...


@dataclass
class SchedulerOutput:
    """admitted: requests admitted this step, with their admissions (their prefill starts now);
    prefill: the request whose next prefill chunk runs this step, or None;
    decode: requests to decode together (empty when a prefill chunk runs)."""

    admitted: list[tuple[Request, Admission]] = field(default_factory=list)
    prefill: Request | None = None
    decode: list[Request] = field(default_factory=list)


class Scheduler:
    """Invariant: a request is in exactly one of ``waiting``, ``prefilling``, ``running`` until it
    finishes; followers are never in ``waiting`` (they wait inside their leader)."""

    def __init__(self, manager: Admitter, max_num_seqs: int = 64) -> None:
        self.manager = manager
        self.block_size = manager.block_size
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.prefilling: dict[str, Request] = {}
        self.running: dict[str, Request] = {}
        self.remaining: dict[str, int] = {}  # prompt tokens left to prefill, set by the engine
        self._decoded_last = False

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def num_unfinished(self) -> int:
        waiting = sum(1 + len(r.followers) for r in self.waiting)
        return waiting + len(self.prefilling) + len(self.running)

    def reserved_blocks(self) -> int:
        """Blocks admitted requests may still allocate."""
        admitted = [*self.prefilling.values(), *self.running.values()]
        return sum(max(0, r.num_reserved_blocks - len(r.block_table)) for r in admitted)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.waiting and len(self.prefilling) + len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            followers_need = sum(f.blocks_needed(self.block_size) for f in req.followers)
            adm = self.manager.admit(req, self.reserved_blocks() + followers_need)
            if adm is not None:
                self.waiting.popleft()
                self._start(req, list(adm.block_table), RequestStatus.PREFILLING)
                self.prefilling[req.request_id] = req
                self.remaining[req.request_id] = len(req.prompt_token_ids) - adm.prefix_len
                for f in req.followers:  # they wait for the leader's prompt KV
                    self._start(f, self.manager.allocate_prompt(f), RequestStatus.RUNNING)
                    self.running[f.request_id] = f
                out.admitted.append((req, adm))
        decode = [r for r in self.running.values() if r.output_token_ids and not r.finished]
        if self.prefilling and not (decode and not self._decoded_last):
            out.prefill = min(self.prefilling.values(), key=lambda r: self.remaining[r.request_id])
            self._decoded_last = False
        else:
            out.decode = decode
            self._decoded_last = bool(decode)
        return out

    def _start(self, req: Request, block_table: list[int], status: RequestStatus) -> None:
        req.status = status
        req.num_reserved_blocks = req.blocks_needed(self.block_size)
        req.block_table = block_table

    def prefilled(self, req: Request) -> None:
        """``req``'s prompt is done: it decodes from now on."""
        self.prefilling.pop(req.request_id, None)
        self.remaining.pop(req.request_id, None)
        req.status = RequestStatus.RUNNING
        self.running[req.request_id] = req

    def finish(self, req: Request) -> None:
        req.status = RequestStatus.FINISHED
        self.running.pop(req.request_id, None)
        self.prefilling.pop(req.request_id, None)
        self.remaining.pop(req.request_id, None)
        try:
            self.waiting.remove(req)
        except ValueError:
            pass
