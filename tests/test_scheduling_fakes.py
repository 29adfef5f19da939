"""Scheduling decisions on the in-process fake fleet (tests/fakefleet.py): the real scheduler,
carrier and job lifecycle, stub workers, no processes and no sleeps."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from scheduler.carrier import HedgePolicy, SchedulerSettings
from storage.sqlite import SqliteDatastore
from tests.fakefleet import Fleet, StubWorker
from tests.helpers import until

FAST = SchedulerSettings(job_timeout=5.0, max_attempts=3, retry_backoff=0.001, hedge=HedgePolicy.OFF)


@pytest.fixture
async def store(tmp_path) -> AsyncIterator[SqliteDatastore]:
    s = SqliteDatastore(tmp_path / "dpip.sqlite3")
    await s.open()
    yield s
    await s.close()


async def fleet_of(store: SqliteDatastore, settings: SchedulerSettings = FAST) -> Fleet:
    fleet = Fleet(store, settings)
    await fleet.scheduler.start()
    return fleet


async def test_workloads_take_turns(store):
    fleet = Fleet(store, FAST)
    big, small = await fleet.workload("big"), await fleet.workload("small")
    await fleet.submit(big, 4)
    await fleet.submit(small, 2)
    w = fleet.membership.add(StubWorker("w", capacity=1))
    await fleet.scheduler.start()
    try:
        for n in range(1, 7):
            await until(lambda n=n: len(w.received) == n, 10, f"job {n}")
            w.finish(w.received[-1].job_id)
        order = [m.workload_id for m in w.received]
        assert order[:4] == [big.id, small.id, big.id, small.id], "a small workload is not starved"
        await until(lambda: _all(fleet, big, ("done", 1)), 10, "every job of the big workload done")
        await until(lambda: _all(fleet, small, ("done", 1)), 10, "every job of the small workload done")
    finally:
        await fleet.scheduler.close()


async def test_a_failed_attempt_goes_to_another_worker(store):
    fleet = await fleet_of(store)
    first = fleet.membership.add(StubWorker("first", cpu_percent=1))
    second = fleet.membership.add(StubWorker("second", cpu_percent=90))
    wl = await fleet.workload("w")
    await fleet.submit(wl, 1)
    try:
        await until(lambda: first.received, 10, "the first attempt, on the idler worker")
        first.fail(first.received[0].job_id)
        await until(lambda: second.received, 10, "the retry, elsewhere")
        second.finish(second.received[0].job_id)
        await until(lambda: _state(fleet, wl, 0, ("done", 2)), 10, "done on the second attempt")
        assert len(first.received) == 1, "the worker that failed it is avoided"
    finally:
        await fleet.scheduler.close()


async def test_an_error_no_retry_can_fix_fails_once_a_second_worker_says_so(store):
    """One worker's "no retry can help" is never the last word (it may be broken, or lie): the
    job goes to another worker; once that one says so too, it fails for good, before its last
    attempt. A job the second worker can do is done."""
    fleet = await fleet_of(store)
    a = fleet.membership.add(StubWorker("a", cpu_percent=1))
    b = fleet.membership.add(StubWorker("b", cpu_percent=90))
    wl = await fleet.workload("w")
    try:
        for image_id, second_says in ((0, "cannot decode"), (1, None)):
            await fleet.submit(wl, 1, first=image_id)
            await until(lambda: a.received and a.received[-1].image_id == image_id, 10, f"image {image_id} on a")
            a.fail(a.received[-1].job_id, "cannot decode", retryable=False)
            await until(lambda: b.received and b.received[-1].image_id == image_id, 10, f"image {image_id} retried on b")
            if second_says:
                b.fail(b.received[-1].job_id, second_says, retryable=False)
            else:
                b.finish(b.received[-1].job_id)
        await until(lambda: _state(fleet, wl, 0, ("failed", 2)), 10, "failed on two workers' word")
        await until(lambda: _state(fleet, wl, 1, ("done", 2)), 10, "done by the second worker")
    finally:
        await fleet.scheduler.close()


async def test_the_only_worker_saying_no_retry_can_help_gets_every_attempt_and_so_does_a_flaky_job(store):
    fleet = await fleet_of(store)
    w = fleet.membership.add(StubWorker("w"))
    wl = await fleet.workload("w")
    await fleet.submit(wl, 2)
    try:
        await until(lambda: len(w.received) == 2, 10, "both jobs")
        final, flaky = w.received
        for n in range(3):  # the only worker: retried on it once nobody else can
            for job, error, retryable in ((final, "cannot decode", False), (flaky, "flaky", True)):
                await until(lambda n=n, job=job: sum(m.job_id == job.job_id for m in w.received) == n + 1, 10, f"attempt {n + 1}")
                w.fail(job.job_id, error, retryable=retryable)
        await until(lambda: _state(fleet, wl, flaky.image_id, ("failed", 3)), 10, "failed after 3 attempts")
        await until(lambda: _state(fleet, wl, final.image_id, ("failed", 3)), 10, "failed after 3 attempts")
    finally:
        await fleet.scheduler.close()


async def test_a_newcomers_claimed_capacity_is_trusted_as_far_as_it_has_proven_it(store):
    """A worker that claims 4096 slots gets eight at first, and twice as many once half of them
    came back with stored results (slow start); failures earn it nothing."""
    fleet = await fleet_of(store)
    big = fleet.membership.add(StubWorker("big", capacity=4096, trusted=False))
    wl = await fleet.workload("w")
    await fleet.submit(wl, 40)
    try:
        await until(lambda: len(big.received) == 8, 10, "eight jobs at first")
        assert fleet.scheduler.queued() == 32
        for m in big.received[:4]:
            big.finish(m.job_id)
        # four slots freed and eight more trusted: sixteen in flight
        await until(lambda: len(big.received) == 20, 10, "half came back: sixteen at once")
        assert fleet.membership.workers["big"].slots() == 16
        for m in big.received[4:]:
            big.fail(m.job_id, "no", retryable=False)
        await until(lambda: len(big.received) >= 36, 10, "failures free slots")
        assert fleet.membership.workers["big"].slots() == 16, "but earn no trust"
    finally:
        await fleet.scheduler.close()


async def test_a_dead_workers_job_is_requeued_at_once(store):
    fleet = await fleet_of(store)
    doomed = fleet.membership.add(StubWorker("doomed", cpu_percent=1))
    wl = await fleet.workload("w")
    await fleet.submit(wl, 1)
    try:
        await until(lambda: doomed.received, 10, "the job on the doomed worker")
        fleet.membership.kill("doomed")
        heir = fleet.membership.add(StubWorker("heir"))
        await until(lambda: heir.received, 10, "the job on the heir")
        heir.finish(heir.received[0].job_id)
        await until(lambda: _state(fleet, wl, 0, ("done", 2)), 10, "done by the heir")
    finally:
        await fleet.scheduler.close()


async def test_a_hedge_goes_to_a_second_worker_and_the_loser_is_cancelled(store):
    hedged = SchedulerSettings(job_timeout=5.0, hedge=HedgePolicy.HEDGED, hedge_initial=0.01, hedge_floor=0.01)
    fleet = await fleet_of(store, hedged)
    slow = fleet.membership.add(StubWorker("slow", cpu_percent=1))
    quick = fleet.membership.add(StubWorker("quick", cpu_percent=90))
    wl = await fleet.workload("w")
    await fleet.submit(wl, 1)
    try:
        await until(lambda: slow.received and quick.received, 10, "the first copy, then the hedge")
        quick.finish(quick.received[0].job_id)
        await until(lambda: slow.cancelled, 10, "the slow copy cancelled")
        await until(lambda: _state(fleet, wl, 0, ("done", 1)), 10, "one attempt, done")
        (timing,) = await store.job_timings(wl.id)
        assert timing["copies"] == 2 and fleet.scheduler.stats.hedges == 1
    finally:
        await fleet.scheduler.close()


async def test_jobs_wait_for_a_worker_with_their_tags(store):
    fleet = await fleet_of(store)
    plain = fleet.membership.add(StubWorker("plain"))
    wl = await fleet.workload("w", tags=("gpu",))
    await fleet.submit(wl, 1)
    try:
        await until(lambda: fleet.scheduler.waiting.get(wl.id), 10, "a reason to wait")
        assert "gpu" in fleet.scheduler.waiting[wl.id] and not plain.received
        gpu = fleet.membership.add(StubWorker("gpu", tags=("gpu",)))
        await until(lambda: gpu.received, 10, "the job on the gpu worker")
        assert wl.id not in fleet.scheduler.waiting
    finally:
        await fleet.scheduler.close()


async def _state(fleet: Fleet, wl, image_id: int, expected: tuple[str, int]) -> bool:
    return (await fleet.states(wl)).get(image_id) == expected


async def _all(fleet: Fleet, wl, expected: tuple[str, int]) -> bool:
    return set((await fleet.states(wl)).values()) == {expected}


async def test_equal_workers_share_jobs_sent_one_at_a_time(store):
    """Ties go round one worker per job placed, however many times the scheduler looks between
    two jobs (each job brings a submit and two releases: a turn per look sent every job to the
    same one of three workers)."""
    fleet = await fleet_of(store)
    stubs = [fleet.membership.add(StubWorker(name, capacity=1)) for name in ("a", "b", "c")]
    wl = await fleet.workload("w")
    try:
        for i in range(9):
            await fleet.submit(wl, 1, first=i)
            await until(lambda i=i: sum(len(s.received) for s in stubs) == i + 1, 10, f"job {i}")
            (stub,) = [s for s in stubs if s.received and s.received[-1].image_id == i]
            stub.finish(stub.received[-1].job_id)
            await until(lambda i=i: _all_done(fleet, wl, i + 1), 10, f"job {i} done")
            for _ in range(2):  # looks that place nothing, as heartbeats' wakes give
                fleet.scheduler._place_what_fits()
        assert sorted(len(s.received) for s in stubs) == [3, 3, 3]
    finally:
        await fleet.scheduler.close()


async def _all_done(fleet: Fleet, wl, n: int) -> bool:
    states = await fleet.states(wl)
    return len(states) == n and all(state == "done" for state, _ in states.values())


async def test_a_late_notification_of_a_job_already_done_here_runs_nothing(store):
    """A job's notification (PostgreSQL) may come after this server scheduled and finished the
    job itself (its own upload): submit_announced ignores it, and one it holds is not queued
    twice; a job it never saw is scheduled."""
    fleet = await fleet_of(store)
    w = fleet.membership.add(StubWorker("w"))
    wl = await fleet.workload("w")
    done = await fleet.jobs.enqueue(wl, 0, "PNG", 10)
    fleet.scheduler.submit(done)
    try:
        await until(lambda: len(w.received) == 1, 10, "the job")
        w.finish(done.id)
        await until(lambda: _state(fleet, wl, 0, ("done", 1)), 10, "done")
        await until(lambda: fleet.scheduler.queued() == 0 and not fleet.scheduler._pending, 10, "settled")
        fleet.scheduler.submit_announced(done)  # its notification, late
        other = await fleet.jobs.enqueue(wl, 1, "PNG", 10)
        fleet.scheduler.submit_announced(other)  # another server's: scheduled
        fleet.scheduler.submit_announced(other)  # (heard twice: queued once)
        await until(lambda: len(w.received) == 2, 10, "the other job")
        assert [m.image_id for m in w.received] == [0, 1]
        w.finish(other.id)
        await until(lambda: _state(fleet, wl, 1, ("done", 1)), 10, "the other done")
        assert len(w.received) == 2 and await _state(fleet, wl, 0, ("done", 1))
    finally:
        await fleet.scheduler.close()


async def test_job_ids_known_before_their_rows_are_never_given_twice(tmp_path):
    """Ids handed out before their rows (SqliteDatastore.reserve_job_id) come from a block set
    aside on disk first: after a "crash" that lost the rows of some (the file reopened, those
    never inserted), no id is given again, and rows that take their own ids land above every
    block. Real SQLite file."""
    from common.models import Filter
    from controller.jobs import JobLifecycle
    from storage import jobrows, sqlite

    path = tmp_path / "dpip.sqlite3"
    store = SqliteDatastore(path)
    await store.open()
    w = await store.create_workload("w", "alice", Filter.GRAYSCALE, ())
    given = [store.reserve_job_id() for _ in range(5)]
    assert None not in given and len(set(given)) == 5
    await store.write(jobrows.enqueue(w, 0, "PNG", 10, 0.0, None, None, None, None, None, 0, job_id=given[0]))
    await store.close()  # the rows of given[1:] never written: as a crash would leave them

    again = SqliteDatastore(path)
    await again.open()
    try:
        after = [again.reserve_job_id() for _ in range(sqlite.JOB_ID_BLOCK)]
        assert all(i is not None for i in after) and min(after) > max(given), (given, after[:3])
        own = await JobLifecycle(again).enqueue(w, 1, "PNG", 10)  # a row that takes its own id
        assert own.id > max(after)
        assert again.reserve_job_id() is None  # the block used up: the next is being set aside
        assert await until(lambda: again.reserve_job_id() is not None, 5, "the next block of ids")
        assert again.reserve_job_id() > own.id
    finally:
        await again.close()
