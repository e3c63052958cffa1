"""The scheduler's fairness, on its own (pure Python, a fake admitter): tenants take turns at
admission and at prefill, aging bounds every request's wait inside its tenant, and the bound stated
in ``sparsex/core/scheduler.py`` holds under floods. Everything is counted in steps, never timed."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsex.core.request import Request, RequestStatus
from sparsex.core.scheduler import MAX_PREFILL_SKIPS, Scheduler
from sparsex.sampling_params import SamplingParams
from tests.fake_admitter import FakeAdmitter

CHUNK = 8  # prompt tokens per prefill chunk in these simulations

_ids = itertools.count()


def req(tenant: str, prompt: int, max_tokens: int = 1, followers: int = 0) -> Request:
    r = Request(f"{tenant}-{next(_ids)}", list(range(prompt)), SamplingParams(max_tokens=max_tokens), tenant=tenant)
    r.followers = [Request(f"{r.request_id}-f{j}", list(range(prompt)), SamplingParams(max_tokens=max_tokens),
                           tenant=tenant) for j in range(followers)]
    return r


def step(sched: Scheduler, admitter: FakeAdmitter) -> Request | None:
    """One engine step as the engine runs it: one prefill chunk of ``CHUNK`` tokens, or one decode
    batch; finished requests give their blocks back. Returns the request whose chunk ran."""
    out = sched.schedule()
    r = out.prefill
    if r is not None:
        r.num_computed_tokens += min(CHUNK, r.num_prompt_tokens_left)
        if r.num_prompt_tokens_left == 0:
            sched.prefilled(r)
            for x in (r, *r.followers):
                x.output_token_ids.append(0)
                finish_if_done(sched, admitter, x)
    for d in out.decode:
        d.output_token_ids.append(0)
        finish_if_done(sched, admitter, d)
    return r


def finish_if_done(sched: Scheduler, admitter: FakeAdmitter, r: Request) -> None:
    if len(r.output_token_ids) >= r.params.max_tokens:
        sched.finish(r)
        admitter.release(r)


def chunks(prompt: int) -> int:
    return -(-prompt // CHUNK)


def test_tenants_take_turns_at_prefill_whatever_their_numbers() -> None:
    admitter = FakeAdmitter(free=10_000)
    sched = Scheduler(admitter)  # type: ignore[arg-type]
    long = req("a", 10 * CHUNK)
    sched.add(long)
    for _ in range(6):
        sched.add(req("b", 2 * CHUNK))
    owners = []
    for _ in range(14):  # no decode: every request generates one token, at the end of its prefill
        r = step(sched, admitter)
        owners.append(r.tenant if r else None)
    assert owners[1:13] == ["a", "b"] * 6  # b's six requests share one turn in two


def test_admission_takes_tenants_in_turn_not_in_arrival_order() -> None:
    admitter = FakeAdmitter(free=10_000)
    sched = Scheduler(admitter)  # type: ignore[arg-type]
    flood = [req("b", 4) for _ in range(5)]
    for r in flood:
        sched.add(r)
    late = req("a", 4)
    sched.add(late)
    assert [r.request_id for r in sched.admission_order()][:3] == [flood[0].request_id, late.request_id,
                                                                  flood[1].request_id]
    admitted = [sched.schedule().admitted[0][0] for _ in range(3)]
    assert admitted == [flood[0], late, flood[1]]


def test_a_head_that_does_not_fit_keeps_its_turn() -> None:
    """Smaller requests of another tenant are not admitted past it, so they cannot starve it of KV."""
    admitter = FakeAdmitter(free=12)
    sched = Scheduler(admitter)  # type: ignore[arg-type]
    first = req("b", 16, max_tokens=4)  # 5 blocks
    sched.add(first)
    sched.schedule()
    big = req("a", 24, max_tokens=4)  # 7 blocks: not beside the 5 reserved by `first`... of 12
    small = req("b", 4)
    sched.add(big)
    sched.add(small)
    admitter.free = 6  # room for `small`, not for `big`
    for _ in range(3):
        assert sched.schedule().admitted == []
    assert big.status is small.status is RequestStatus.WAITING
    admitter.free = 12
    assert sched.schedule().admitted[0][0] is big


def test_aging_bounds_a_long_prefill_under_its_own_tenants_flood() -> None:
    """Shortest-first alone would run only the shorts while they keep coming."""
    admitter = FakeAdmitter(free=100_000)
    sched = Scheduler(admitter)  # type: ignore[arg-type]
    long = req("a", 12 * CHUNK)
    sched.add(long)
    gaps, since, most_prefilling = [], 0, 0
    for _ in range(400):
        sched.add(req("a", CHUNK))  # one new short per step, forever
        most_prefilling = max(most_prefilling, sched.num_prefilling)
        ran = step(sched, admitter)
        if long.status is RequestStatus.PREFILLING or ran is long:
            since += 1
            if ran is long:
                gaps.append(since)
                since = 0
        if long.num_prompt_tokens_left == 0:
            break
    assert long.num_prompt_tokens_left == 0
    # one tenant: every prefill step is its turn; passed over at most max_skips + N - 1 in a row
    assert max(gaps) <= MAX_PREFILL_SKIPS + most_prefilling
    assert any(g > 1 for g in gaps)  # the shorts did run in between (shortest first below the limit)


@settings(max_examples=40, deadline=None)
@given(
    long_chunks=st.integers(1, 12),
    flood=st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 4 * CHUNK), st.integers(1, 3)),
                   min_size=0, max_size=6),
    max_skips=st.integers(1, 6),
)
def test_the_stated_bound_holds_under_any_flood(long_chunks: int, flood: list[tuple[str, int, int]],
                                                max_skips: int) -> None:
    """Every step the flood sends the same batch again; the long request of tenant ``a`` gets its
    first token within 2 * T * (max_skips + N) * c steps of its admission (``sparsex/core/scheduler.py``)."""
    admitter = FakeAdmitter(free=1_000_000)
    sched = Scheduler(admitter, max_num_seqs=16, max_skips=max_skips)  # type: ignore[arg-type]
    long = req("a", long_chunks * CHUNK, max_tokens=2)
    sched.add(long)
    admitted_at, done_at, most_tenants, most_own = None, None, 1, 1
    for i in range(20_000):
        for tenant, prompt, max_tokens in flood:
            sched.add(req(tenant, prompt, max_tokens))
        tenants = {r.tenant for r in _prefilling(sched)}
        most_tenants = max(most_tenants, len(tenants))
        most_own = max(most_own, sum(r.tenant == "a" for r in _prefilling(sched)))
        step(sched, admitter)
        if admitted_at is None and long.status is not RequestStatus.WAITING:
            admitted_at = i
        if long.output_token_ids:
            done_at = i
            break
    assert admitted_at is not None and done_at is not None
    assert done_at - admitted_at + 1 <= 2 * most_tenants * (max_skips + most_own) * long_chunks


def _prefilling(sched: Scheduler) -> list[Request]:
    return [r for t in sched._prefills.values() for r in t.requests.values()]


def test_a_waiting_request_that_finishes_is_never_admitted() -> None:
    admitter = FakeAdmitter(free=1000)
    sched = Scheduler(admitter)  # type: ignore[arg-type]
    gone, kept = req("a", 4, followers=2), req("a", 4)
    sched.add(gone)
    sched.add(kept)
    assert sched.num_unfinished == 4
    for r in (gone, *gone.followers):
        sched.finish(r)
    assert sched.num_unfinished == 1
    assert [r for r in sched.admission_order()] == [kept]
    assert sched.schedule().admitted[0][0] is kept


def test_a_follower_aborted_while_its_leader_waits_is_not_started() -> None:
    admitter = FakeAdmitter(free=1000)
    sched = Scheduler(admitter)  # type: ignore[arg-type]
    leader = req("a", 4, followers=2)
    sched.add(leader)
    sched.finish(leader.followers[0])
    assert sched.num_unfinished == 2
    sched.schedule()
    assert leader.followers[0].status is RequestStatus.FINISHED and not leader.followers[0].block_table
    assert leader.followers[1].status is RequestStatus.RUNNING
    assert sched.num_unfinished == 2


def test_max_skips_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_skips"):
        Scheduler(FakeAdmitter(free=1), max_skips=0)  # type: ignore[arg-type]
