"""Scheduler: decides what each engine step runs (pure Python, no torch).

    waiting (a FIFO per tenant) ──admit──▶ prefilling ──chunks──▶ running (decode batches) ──▶ finished
      tenants take turns                    tenants take turns,    (followers join here)
                                            then fewest tokens
                                            left, with aging

A step runs one prefill chunk (at most ``max_prefill_tokens`` tokens of a full prefill, or the next
layers of a reuse prefill, about as much work) or one decode batch of every running request. Policy:

1. **Admission.** Tenants with waiting requests take turns (a tenant goes to the back after its
   turn, and one that starts waiting joins at the back); within a tenant, first come first served.
   The head of the tenant whose turn it is is admitted when the KV manager can find its cache hits
   and hold its whole prompt and ``max_tokens`` (and its followers': other choices of the same
   prompt) beside what admitted requests reserved, and fewer than ``max_num_seqs`` requests are
   admitted. If it does not fit, nobody is admitted: it keeps its turn until finishing requests
   free room (so small requests cannot starve a big one of KV). So before a waiting request is
   admitted, at most (j + 1) · T - 1 others are (j: requests of its own tenant ahead of it; T:
   tenants with requests waiting), and between two admissions the scheduler waits only for room,
   which admitted requests free as they finish. Admission reserves every block a request may still
   need, so a running request never runs out of KV and no preemption is needed.
2. **Prefill or decode.** When both are waiting they alternate, so decoding never stalls behind
   prefills and prefills always progress: a prefill chunk runs at least every second step.
3. **Which prefill.** Tenants with a request prefilling take turns, the same way. Within the
   tenant, the request with the fewest prompt tokens left runs (a short request gets its first
   token after one chunk), unless some request has gone ``max_skips`` of its tenant's turns
   without a chunk: then the one that has gone longest runs (aging).

**The bound.** With at most T tenants with a request prefilling and at most N requests prefilling
in a request's own tenant (N <= ``max_num_seqs``) while it waits, a request with c prefill chunks
left gets its first token within

    2 · T · (max_skips + N) · c   engine steps      (2 · T · c when it is its tenant's only one)

of its admission, whatever the others send. Why: a prefill step comes at least every 2 steps
(rule 2); the tenant's turn at least every T prefill steps (a tenant that joins goes behind those
already waiting); and the request is passed over at most ``max_skips`` + N - 1 of its tenant's
turns in a row: after ``max_skips`` it is due, and only the N - 1 others that have waited longer
can go before it, once each (their wait restarts at 0 when they run); requests admitted later
never get ahead of a due one. c is ``ceil(tokens left / max_prefill_tokens)``, where a reuse
prefill's tokens left are its work left in full-prefill tokens (token-layers / layers).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from sparsex.core.request import Request, RequestStatus
from sparsex.kv.admission import Admission

MAX_PREFILL_SKIPS = 4
"""Default ``max_skips``: a request's share of its own tenant's prefill turns is at least one in
``MAX_PREFILL_SKIPS + N``; below it, shortest-remaining-first decides."""


class Admitter(Protocol):
    """Decides cache hits and reserves blocks in one step (``sparsex.kv.admission.KVCacheManager``)."""

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


@dataclass
class _TenantPrefills:
    """One tenant's requests that are prefilling, and how many prefill turns the tenant has had.

    A request's wait is ``num_turns - req.last_prefill_turn``: the tenant's turns since it last ran
    a chunk (or was admitted)."""

    requests: dict[str, Request] = field(default_factory=dict)
    num_turns: int = 0


class Scheduler:
    """Invariants: a request is in exactly one of waiting, prefilling, running until it finishes;
    followers are never waiting on their own (they wait inside their leader). The dicts of tenants
    are in turn order: the first key goes next, a tenant that had its turn moves to the end, a
    tenant with nothing left leaves. Finished requests leave the waiting FIFOs lazily (at the head)."""

    def __init__(self, manager: Admitter, max_num_seqs: int = 64, max_skips: int = MAX_PREFILL_SKIPS) -> None:
        if max_skips < 1:
            raise ValueError(f"max_skips must be >= 1, got {max_skips}")
        self.manager = manager
        self.block_size = manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_skips = max_skips
        self._waiting: dict[str, deque[Request]] = {}  # tenant -> FIFO, in admission turn order
        self._num_waiting = 0  # unfinished waiting requests, followers included
        self._prefills: dict[str, _TenantPrefills] = {}  # tenant -> its prefills, in prefill turn order
        self._running: dict[str, Request] = {}
        self._decoded_last = False

    # ----- what callers ask ----------------------------------------------------------------------

    def add(self, req: Request) -> None:
        """Queue a request (with its followers) at the end of its tenant's FIFO."""
        self._waiting.setdefault(req.tenant, deque()).append(req)
        self._num_waiting += 1 + len(req.followers)

    @property
    def num_unfinished(self) -> int:
        return self._num_waiting + self.num_prefilling + len(self._running)

    @property
    def num_prefilling(self) -> int:
        return sum(len(t.requests) for t in self._prefills.values())

    def admission_order(self) -> Iterator[Request]:
        """Waiting requests in the order they will be admitted if nothing else arrives: tenants'
        heads in turn order, then their second requests, and so on (for the tiers' prefetch)."""
        queues = [iter(q) for q in self._waiting.values()]
        for batch in itertools.zip_longest(*queues):
            yield from (r for r in batch if r is not None and not r.finished)

    def reserved_blocks(self) -> int:
        """Blocks admitted requests may still allocate."""
        admitted = itertools.chain(self._running.values(), *(t.requests.values() for t in self._prefills.values()))
        return sum(max(0, r.num_reserved_blocks - len(r.block_table)) for r in admitted)

    # ----- the step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        admitted = self._admit_next()
        if admitted is not None:
            out.admitted.append(admitted)
        decode = [r for r in self._running.values() if r.output_token_ids and not r.finished]
        if self._prefills and not (decode and not self._decoded_last):
            out.prefill = self._next_prefill()
            self._decoded_last = False
        else:
            out.decode = decode
            self._decoded_last = bool(decode)
        return out

    def _admit_next(self) -> tuple[Request, Admission] | None:
        """Admit the head of the tenant whose turn it is, if it fits (rule 1)."""
        self._drop_finished_heads()
        if not self._waiting or self.num_prefilling + len(self._running) >= self.max_num_seqs:
            return None
        tenant, queue = next(iter(self._waiting.items()))
        req = queue[0]
        followers = [f for f in req.followers if not f.finished]
        followers_need = sum(f.blocks_needed(self.block_size) for f in followers)
        adm = self.manager.admit(req, self.reserved_blocks() + followers_need)
        if adm is None:
            return None  # it keeps its turn
        queue.popleft()
        del self._waiting[tenant]
        if queue:
            self._waiting[tenant] = queue  # back of the turn order
        self._num_waiting -= 1 + len(followers)
        self._start(req, list(adm.block_table), RequestStatus.PREFILLING)
        req.num_computed_tokens = adm.prefix_len
        prefills = self._prefills.setdefault(tenant, _TenantPrefills())
        req.last_prefill_turn = prefills.num_turns
        prefills.requests[req.request_id] = req
        for f in followers:  # they wait for the leader's prompt KV
            self._start(f, self.manager.allocate_prompt(f), RequestStatus.RUNNING)
            self._running[f.request_id] = f
        return req, adm

    def _drop_finished_heads(self) -> None:
        for tenant in [t for t, q in self._waiting.items() if q and q[0].finished]:
            queue = self._waiting[tenant]
            while queue and queue[0].finished:
                queue.popleft()
            if not queue:
                del self._waiting[tenant]

    def _next_prefill(self) -> Request:
        """The request whose chunk runs now (rule 3); the tenant goes to the back of the turn order."""
        tenant, prefills = next(iter(self._prefills.items()))
        reqs = list(prefills.requests.values())  # admission order: ties go to the earlier

        def waited(r: Request) -> int:
            return prefills.num_turns - r.last_prefill_turn

        due = [r for r in reqs if waited(r) >= self.max_skips]
        chosen = max(due, key=waited) if due else min(reqs, key=lambda r: r.num_prompt_tokens_left)
        prefills.num_turns += 1
        chosen.last_prefill_turn = prefills.num_turns
        del self._prefills[tenant]
        self._prefills[tenant] = prefills
        return chosen

    def _start(self, req: Request, block_table: list[int], status: RequestStatus) -> None:
        req.status = status
        req.num_reserved_blocks = req.blocks_needed(self.block_size)
        req.block_table = block_table

    # ----- what the engine reports -----------------------------------------------------------------

    def prefilled(self, req: Request) -> None:
        """``req``'s prompt is done: it decodes from now on."""
        self._leave_prefilling(req)
        req.status = RequestStatus.RUNNING
        self._running[req.request_id] = req

    def finish(self, req: Request) -> None:
        """``req`` is done (or aborted or failed), wherever it is."""
        if req.status is RequestStatus.WAITING:
            self._num_waiting -= 1  # its FIFO drops it when it reaches the head
        req.status = RequestStatus.FINISHED
        self._running.pop(req.request_id, None)
        self._leave_prefilling(req)

    def _leave_prefilling(self, req: Request) -> None:
        prefills = self._prefills.get(req.tenant)
        if prefills is not None and prefills.requests.pop(req.request_id, None) is not None:
            if not prefills.requests:
                del self._prefills[req.tenant]
