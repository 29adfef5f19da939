"""The datastore contract (storage.datastore.Datastore) and the job lifecycle on top of it,
run against every implementation: today the SQLite store, on a real file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from common.models import Conflict, Filter, ImageType, Job, JobState, NotFound
from controller.jobs import JobLifecycle
from storage.datastore import Datastore
from storage.sql import Script, q
from storage.sqlite import SqliteDatastore


def _postgres(request, tmp: Path) -> Datastore:
    """A fresh database of the session's PostgreSQL (started by the tests; skipped with the
    reason where it cannot run)."""
    from storage.postgres import PostgresDatastore

    server = request.getfixturevalue("postgres")
    return PostgresDatastore(server.new_database(f"contract_{tmp.name}"))


IMPLEMENTATIONS: dict[str, Callable[[pytest.FixtureRequest, Path], Datastore]] = {
    "sqlite": lambda request, tmp: SqliteDatastore(tmp / "dpip.sqlite3"),
    "postgresql": _postgres,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
async def store(request, tmp_path) -> AsyncIterator[Datastore]:
    s = IMPLEMENTATIONS[request.param](request, tmp_path)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def job_state(store: Datastore, wid: str, image_id: int) -> tuple[str, int]:
    (row,) = [j for j in await store.job_timings(wid) if j["image_id"] == image_id]
    return row["state"], row["attempts"]


async def test_a_job_goes_queued_dispatched_done(store):
    jobs = JobLifecycle(store)
    w = await store.create_workload("w", "alice", Filter.GRAYSCALE, ())
    job = await jobs.enqueue(w, 0, "PNG", 10)
    assert job.state == JobState.QUEUED and await job_state(store, w.id, 0) == ("queued", 0)
    dispatched = await jobs.dispatch(job, "w1", 60)
    assert dispatched is not None and dispatched.attempts == 1 and dispatched.state == JobState.DISPATCHED
    assert await jobs.dispatch(job, "w2", 60) is None, "dispatched twice"
    assert await jobs.complete(w.id, 0, "PNG", 5) is True
    assert await jobs.complete(w.id, 0, "PNG", 6) is False, "the first result wins"
    assert await jobs.has_result(job)
    assert await jobs.retry(dispatched, "late failure") is None, "a done job is not requeued"
    assert await jobs.fail(dispatched, "late failure") is None, "a done job does not fail"
    assert await job_state(store, w.id, 0) == ("done", 1)
    view = await store.workload_view(w)
    assert view.filtered_images == [0] and view.status.value == "completed"


async def test_retry_fail_and_recover(store):
    jobs = JobLifecycle(store)
    w = await store.create_workload("w", "alice", Filter.BLUR, ("gpu",))
    a, b = await jobs.enqueue(w, 0, "PNG", 10), await jobs.enqueue(w, 1, "PNG", 10)
    assert await jobs.retry(a, "not dispatched") is None, "only a dispatched job is retried"
    da = await jobs.dispatch(a, "w1", 60)
    assert da is not None
    again = await jobs.retry(da, "worker died")
    assert again is not None and again.state == JobState.QUEUED and again.attempts == 1
    db = await jobs.dispatch(b, "w1", 60)
    assert db is not None
    failed = await jobs.fail(db, "cannot decode")
    assert failed is not None and failed.state == JobState.FAILED
    # a crash while job 0 is dispatched: recover puts it back, failed ones stay failed
    assert await jobs.dispatch(again, "w2", 60) is not None
    recovered = await jobs.recover()
    assert [(j.image_id, j.attempts, j.tags, j.filter) for j in recovered] == [(0, 2, ("gpu",), Filter.BLUR)]
    assert await job_state(store, w.id, 0) == ("queued", 2)
    assert (await store.workload_view(w)).failed_images == [{"image_id": 1, "reason": "cannot decode"}]


async def test_a_failed_transition_leaves_nothing_half_done(store):
    """enqueue is three statements; when the last fails, the first two are rolled back."""
    jobs = JobLifecycle(store)
    w = await store.create_workload("w", "alice", Filter.GRAYSCALE, ())
    await jobs.enqueue(w, 0, "PNG", 10)
    with pytest.raises(Exception):
        await jobs.enqueue(w, 0, "JPEG", 99)  # a second job for image 0 violates UNIQUE
    assert await store.next_image_id(w.id) == 1
    assert await store.get_image(w.id, 0, ImageType.ORIGINAL) == "PNG", "the image row was replaced"
    await jobs.enqueue(w, 1, "PNG", 10)  # and the store still works
    assert await store.next_image_id(w.id) == 2


async def test_concurrent_transitions_and_writes_stay_consistent(store):
    """Many coroutines at once on the one connection: each transition is all or nothing."""
    jobs = JobLifecycle(store)
    w = await store.create_workload("w", "alice", Filter.GRAYSCALE, ())
    n = 60

    async def one(i: int) -> None:
        job = await jobs.enqueue(w, i, "PNG", 10)
        await store.upsert_worker(f"w{i % 3}", [], "tcp://127.0.0.1:1")  # unrelated writes in between
        d = await jobs.dispatch(job, f"w{i % 3}", 60)
        assert d is not None
        if i % 4 == 0:
            assert await jobs.retry(d, "flaky") is not None
        else:
            assert await jobs.complete(w.id, i, "PNG", 5)
        await store.workload_view(w)  # reads interleaved with the writes

    await asyncio.gather(*(one(i) for i in range(n)))
    retried = len(range(0, n, 4))
    assert await store.job_counts() == {"done": n - retried, "queued": retried}
    assert await store.next_image_id(w.id) == n
    assert len(await store.list_images(w.id, ImageType.ORIGINAL)) == n


async def test_a_dispatch_in_flight_and_its_result_never_deadlock(store):
    """The scheduler writes a job's dispatch while the job travels, so a quick job's result is
    recorded at the same moment as its dispatch, while uploads to the workload take ids: every
    transition takes its job's row before its workload's (PostgreSQL found the other order, the
    result's image row first, deadlocking with the dispatch in flight)."""
    jobs = JobLifecycle(store)
    w = await store.create_workload("w", "alice", Filter.GRAYSCALE, ())
    n = 120
    queued = [await jobs.enqueue(w, i, "PNG", 10) for i in range(n)]

    async def one(job) -> None:
        await asyncio.gather(jobs.dispatch(job, "w1", 60), jobs.complete(w.id, job.image_id, "PNG", 5),
                             jobs.ids.take(w.id))

    await asyncio.gather(*(one(job) for job in queued))
    assert await store.job_counts() == {"done": n}
    view = await store.workload_view(w)
    assert len(view.filtered_images) == n and view.running_jobs == 0, view


async def test_workload_names_are_per_owner_and_users_do_not_inherit(store):
    a = await store.create_workload("same", "alice", Filter.GRAYSCALE, ())
    b = await store.create_workload("same", "bob", Filter.GRAYSCALE, ())
    assert a.dir != b.dir
    with pytest.raises(Conflict):
        await store.create_workload("same", "alice", Filter.GRAYSCALE, ())
    await store.add_user("alice", "hash")
    assert await store.remove_user("alice")
    assert await store.workloads("alice") == []
    with pytest.raises(NotFound):
        await store.get_workload(a.id, "alice")


async def test_workers_are_remembered_and_forgotten(store):
    await store.upsert_worker("w1", ["gpu"], "tcp://127.0.0.1:1")
    assert [(w["name"], w["tags"]) for w in await store.known_workers()] == [("w1", ["gpu"])]
    await store.forget_worker("w1")
    assert await store.known_workers() == []


async def test_an_original_keeps_its_header_for_checking_results(store):
    jobs = JobLifecycle(store)
    w = await store.create_workload("w", "alice", Filter.GRAYSCALE, ())
    await jobs.enqueue(w, 0, "PNG", 10, (64, 48, "RGB"))
    await jobs.enqueue(w, 1, "PNG", 10)  # as earlier versions stored them
    assert await store.image_header(w.id, 0, ImageType.ORIGINAL) == ("PNG", 64, 48, "RGB")
    assert await store.image_header(w.id, 1, ImageType.ORIGINAL) == ("PNG", None, None, None)
    with pytest.raises(NotFound):
        await store.image_header(w.id, 2, ImageType.ORIGINAL)


async def test_counters_follow_every_transition_and_active_is_one_query(store):
    """The workload's counters (kept by the store, not recounted) agree with its rows after
    enqueue, dispatch, retry, fail, complete and recover; completed workloads leave the active list."""
    jobs = JobLifecycle(store)
    w = await store.create_workload("w", "alice", Filter.GRAYSCALE, ())
    done_w = await store.create_workload("done", "alice", Filter.GRAYSCALE, ())
    a, b, c = [await jobs.enqueue(w, i, "PNG", 10) for i in range(3)]
    da, db_, dc = [await jobs.dispatch(j, "w1", 60) for j in (a, b, c)]
    view = await store.workload_view(w)
    assert (view.image_count, view.running_jobs, view.started) == (3, 3, True)
    await jobs.retry(da, "flaky")
    await jobs.fail(db_, "broken")
    await jobs.complete(w.id, 2, "PNG", 5)
    await jobs.complete(w.id, 2, "PNG", 5)  # a duplicate result counts once
    view = await store.workload_view(w)
    assert (view.running_jobs, view.filtered_images, [f["image_id"] for f in view.failed_images]) == (0, [2], [1])
    await jobs.complete(w.id, 1, "PNG", 5)  # a late result wins over the failure
    view = await store.workload_view(w)
    assert (view.filtered_images, view.failed_images) == ([1, 2], [])
    again = await jobs.dispatch((await jobs.recover())[0], "w2", 60)
    assert again is not None and (await store.workload_view(w)).running_jobs == 1
    assert [v.workload.id for v in await store.active_views("alice")] == [w.id, done_w.id]
    await jobs.complete(w.id, 0, "PNG", 5)
    dj = await jobs.dispatch(await jobs.enqueue(done_w, 0, "PNG", 10), "w1", 60)
    assert dj is not None
    await jobs.complete(done_w.id, 0, "PNG", 5)
    assert await store.active_views("alice") == []
    page, total, after = await store.workload_page("alice", limit=1)
    assert ([v.workload.id for v in page], total) == ([done_w.id], 2)
    rest, _, more = await store.workload_page("alice", limit=1, after=after)
    assert [v.workload.id for v in rest] == [w.id] and more is None


async def test_grouped_transactions_commit_together_and_fail_alone(store):
    """Concurrent transactions share commits; one that raises leaves nothing behind and the
    others of its group stand; each caller hears back only after its group is committed."""
    w = await store.create_workload("w", "alice", Filter.GRAYSCALE, ())

    def take() -> Script[int]:
        return (yield q("UPDATE workloads SET next_image_id = next_image_id + 1 WHERE id = ?"
                        " RETURNING next_image_id - 1", w.id)).scalar()

    def half_then_fail() -> Script[None]:
        yield from take()
        raise ValueError("changed my mind")

    results = await asyncio.gather(*(store.write(half_then_fail() if i % 5 == 4 else take()) for i in range(50)),
                                   return_exceptions=True)
    failed = [r for r in results if isinstance(r, ValueError)]
    taken = sorted(r for r in results if isinstance(r, int))
    assert len(failed) == 10
    assert taken == list(range(40)), "the failed ones took no id: their savepoints rolled back"
    assert await store.next_image_id(w.id) == 40, "what each caller heard is what is stored"
    group = getattr(store, "_group", None)
    if group is not None:  # the SQLite store's own figures: 50 concurrent, far fewer commits
        assert group.transactions >= 50 and group.groups < group.transactions


async def test_a_transition_recovery_redoes_need_not_wait_for_the_disk_but_is_committed(store, tmp_path):
    """dispatch is not durable (after a crash every dispatched job is queued again), yet what
    it wrote is committed when it returns: another connection sees it; a durable transition
    after it makes both durable, in order."""
    import sqlite3

    jobs = JobLifecycle(store)
    w = await store.create_workload("w", "alice", Filter.GRAYSCALE, ())
    job = await jobs.enqueue(w, 0, "PNG", 10)
    assert await jobs.dispatch(job, "w1", 60) is not None
    assert await job_state(store, w.id, 0) == ("dispatched", 1)
    path = getattr(store, "path", None)
    if path is not None:  # SQLite: a second connection, as another process would open
        with sqlite3.connect(path) as other:
            assert other.execute("SELECT state FROM jobs WHERE id = ?", (job.id,)).fetchone() == ("dispatched",)
    group = getattr(store, "_group", None)
    if group is not None:
        assert group.lazy_groups >= 1, "a group of dispatches alone is committed without an fsync"
    assert await jobs.complete(w.id, 0, "PNG", 5) is True
    assert await job_state(store, w.id, 0) == ("done", 1)


async def test_original_ids_are_distinct_dense_and_given_back(store, tmp_path):
    """Concurrent uploads take ids in memory without a lock over their I/O: all distinct, no
    gap; a chosen id in use is a 409; an upload that fails returns its id; a restart (a new
    lifecycle) goes on from the datastore."""
    from storage.filestore import FileImageStore
    from storage.images import ReceivedImage
    from tests.helpers import png_bytes

    (tmp_path / "incoming").mkdir()
    images = FileImageStore(tmp_path / "images", tmp_path / "incoming", 10**7, 10**8)
    jobs = JobLifecycle(store, images)
    w = await store.create_workload("w", "alice", Filter.GRAYSCALE, ())
    png = png_bytes()

    async def upload(lifecycle: JobLifecycle, chosen: int | None = None) -> int:
        return (await lifecycle.accept_original(w, await images.receive_bytes(png), chosen)).image_id

    assert sorted(await asyncio.gather(*(upload(jobs) for _ in range(20)))) == list(range(20))
    with pytest.raises(Conflict):
        await upload(jobs, chosen=3)
    missing = ReceivedImage(tmp_path / "incoming" / "gone.upload", "PNG", 10, 1, 1, "L")
    with pytest.raises(OSError):
        await jobs.accept_original(w, missing, None)
    assert await upload(jobs) == 20, "the failed upload gave its id back"
    assert await upload(jobs, chosen=30) == 30
    assert await upload(jobs) == 31, "counted past a chosen id"
    assert await upload(JobLifecycle(store, images)) == 32, "after a restart, from the datastore"
    await images.close()


async def test_an_original_and_its_row_are_written_together_and_a_file_that_fails_writes_no_row(store, tmp_path):
    """write_with_files: each file is in place (synced) before the row that records it, in one
    trip to SQLite's thread; a file that cannot be written fails its own transaction only (its
    script never runs), and one already there with replace off is not placed, its script run."""
    from storage.groupwrite import GroupWriter

    (tmp_path / "incoming").mkdir()
    writer = GroupWriter(tmp_path / "incoming")
    w = await store.create_workload("w", "alice", Filter.GRAYSCALE, ())
    (tmp_path / "blocked").write_bytes(b"a file where a directory should be")

    def bump() -> Script[int]:
        yield q("UPDATE workloads SET next_image_id = next_image_id + 1 WHERE id = ?", w.id)
        return (yield q("SELECT next_image_id FROM workloads WHERE id = ?", w.id)).one()[0]

    def target(i: int) -> Path:
        return tmp_path / ("blocked" if i == 7 else "images") / f"{i}.png"

    writes = [writer.prepare(b"x" * (i + 1), target(i), replace=True, sync=i % 2 == 0) for i in range(12)]
    outcomes = await asyncio.gather(*(store.write_with_files(bump(), [f], durable=i % 2 == 0)
                                      for i, f in enumerate(writes)), return_exceptions=True)
    assert isinstance(outcomes[7], OSError) and not writes[7].placed
    assert sorted(o for o in outcomes if isinstance(o, int)) == list(range(1, 12)), "11 scripts ran, once each"
    assert await store.next_image_id(w.id) == 11
    for i, f in enumerate(writes):
        assert (i != 7) == f.placed == target(i).exists()
        if i != 7:
            assert target(i).read_bytes() == b"x" * (i + 1)
    again = writer.prepare(b"second", target(0), replace=False)
    assert await store.write_with_files(bump(), [again], durable=False) == 12
    assert not again.placed and target(0).read_bytes() == b"x", "the first file wins"
    writer.close()


async def test_a_transaction_postgresql_aborts_to_break_a_deadlock_says_try_again(request, tmp_path):
    """Two writes taking two rows in opposite orders: PostgreSQL aborts one of them; it fails as
    Unavailable ("try again": a 503 at the API, a transient failure for a job), never as an
    engine's exception, and the other is written."""
    from common.models import Unavailable

    store = _postgres(request, tmp_path)
    await store.open()
    try:
        a = await store.create_workload("a", "alice", Filter.GRAYSCALE, ())
        b = await store.create_workload("b", "alice", Filter.GRAYSCALE, ())

        def crossing(first: str, second: str) -> Script[None]:
            yield q("UPDATE workloads SET next_image_id = next_image_id + 1 WHERE id = ?", first)
            yield q("SELECT pg_sleep(0.3)")
            yield q("UPDATE workloads SET next_image_id = next_image_id + 1 WHERE id = ?", second)

        outcomes = await asyncio.gather(store.write(crossing(a.id, b.id)), store.write(crossing(b.id, a.id)),
                                        return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(failed) == 1 and isinstance(failed[0], Unavailable), outcomes
        assert "try again" in str(failed[0])
        assert await store.next_image_id(a.id) == 1 and await store.next_image_id(b.id) == 1
    finally:
        await store.close()


async def test_postgresql_waits_for_the_disk_only_where_a_write_must_be_durable(request, tmp_path):
    """The pool's connections commit lazily; a durable transaction waits as the database is
    configured to (here: on); a lazy write of one statement runs without a transaction of its
    own and is committed when it returns (another connection sees it)."""
    import asyncpg

    store = _postgres(request, tmp_path)
    await store.open()
    try:
        def setting() -> Script[str]:
            yield q("SELECT 1")  # (two statements: a transaction of its own)
            return (yield q("SELECT current_setting('synchronous_commit')")).one()[0]

        assert await store.write(setting()) == "on"
        assert await store.write(setting(), durable=False) == "off"
        jobs = JobLifecycle(store)
        w = await store.create_workload("w", "alice", Filter.GRAYSCALE, ())
        job = await jobs.enqueue(w, 0, "PNG", 10)
        assert await jobs.dispatch(job, "w1", 60) is not None
        other = await asyncpg.connect(store.url)
        try:
            assert await other.fetchval("SELECT state FROM jobs WHERE id = $1", job.id) == "dispatched"
        finally:
            await other.close()
    finally:
        await store.close()


async def test_a_result_is_recorded_once_and_one_of_a_deleted_workload_says_gone(store):
    """record_result: the first result of a job is RECORDED (its job done, its row counted), a
    second is a DUPLICATE, and one whose workload was deleted meanwhile is GONE (its caller then
    takes its file or object away)."""
    from storage import jobrows

    jobs = JobLifecycle(store)
    # Every form the engine runs: the statements one by one, and (PostgreSQL) all in one.
    forms = [jobrows.record_result] + ([jobrows.record_result_at_once] if store.modifying_ctes else [])
    for n, record in enumerate(forms):
        w = await store.create_workload(f"w{n}", "alice", Filter.GRAYSCALE, ())
        job = await jobs.enqueue(w, 0, "PNG", 10)
        await jobs.dispatch(job, "w1", 60)
        timing = ("w1", 1.0, 2.0, 3.0)
        assert await store.write(record(w.id, 0, "PNG", 7, 1.0, timing), durable=False) == jobrows.RECORDED
        assert await store.write(record(w.id, 0, "PNG", 8, 2.0, None), durable=False) == jobrows.DUPLICATE
        assert await job_state(store, w.id, 0) == ("done", 1)
        view = await store.workload_view(w)
        assert view.filtered_images == [0] and view.image_count == 1 and view.running_jobs == 0
        assert (await store.job_timings(w.id))[0]["worker"] == "w1"
        other = await store.create_workload(f"v{n}", "alice", Filter.GRAYSCALE, ())
        await jobs.enqueue(other, 0, "PNG", 10)
        assert await store.delete_workload(other.id) is not None
        assert await store.write(record(other.id, 0, "PNG", 7, 1.0, timing), durable=False) == jobrows.GONE


async def test_a_dispatch_not_written_is_counted_with_the_result(store):
    """record_result with the job's unwritten dispatch: the job done, one attempt and one copy
    counted, its dispatch time and deadline kept, its worker named (the winning copy's when
    timed), on every form the engine runs."""
    from storage import jobrows

    forms = [jobrows.record_result] + ([jobrows.record_result_at_once] if store.modifying_ctes else [])
    jobs = JobLifecycle(store)
    for n, record in enumerate(forms):
        for timing in (None, ("w2", 1.0, 2.0, 3.0)):
            w = await store.create_workload(f"f{n}{timing is None}", "alice", Filter.GRAYSCALE, ())
            await jobs.enqueue(w, 0, "PNG", 10)
            script = record(w.id, 0, "PNG", 7, 5.0, timing, ("w1", 4.0, 64.0))
            assert await store.write(script, durable=False) == jobrows.RECORDED
            assert await job_state(store, w.id, 0) == ("done", 1)
            row = (await store.job_timings(w.id))[0]
            assert row["copies"] == 1 and row["dispatched_at"] == 4.0 and row["finished_at"] == 5.0
            assert row["worker"] == ("w1" if timing is None else "w2")
            assert (await store.workload_view(w)).filtered_images == [0]


async def test_a_quick_job_has_one_write_and_a_slow_one_is_seen_dispatched(store):
    """dispatch_later: a workload's first dispatch is written at once; then a job whose result
    comes back at once is written once (its result's row counts its dispatch); one still running DISPATCH_WRITE_DELAY later is written
    ``dispatched``; an attempt that failed writes its dispatch before its retry."""
    jobs = JobLifecycle(store)
    w = await store.create_workload("d", "alice", Filter.GRAYSCALE, ())
    first, quick, slow, failing = [await jobs.enqueue(w, i, "PNG", 10) for i in (5, 0, 1, 2)]
    jobs.dispatch_later(first, "w1", 60)  # a workload's first: written at once (it says "running")
    await wait_for_state(store, w.id, 5, "dispatched")
    assert (await store.workload_view(w)).status.value == "running"
    jobs.dispatch_later(quick, "w1", 60)
    assert await job_state(store, w.id, 0) == ("queued", 0)
    assert jobs.running_unwritten(w.id) == 1  # (what the API adds to the row's running jobs)
    assert await jobs.complete(w.id, 0, "PNG", 7)
    assert await job_state(store, w.id, 0) == ("done", 1) and jobs.running_unwritten(w.id) == 0
    jobs.dispatch_later(slow, "w1", 60)
    await wait_for_state(store, w.id, 1, "dispatched")
    assert jobs.running_unwritten(w.id) == 0
    assert await jobs.complete(w.id, 1, "PNG", 7)
    assert await job_state(store, w.id, 1) == ("done", 1)
    dispatched = jobs.dispatch_later(failing, "w1", 60)
    assert await jobs.dispatched(dispatched) and jobs.running_unwritten(w.id) == 0
    assert await jobs.retry(dispatched, "worker lost") is not None
    assert await job_state(store, w.id, 2) == ("queued", 1)
    jobs.dispatch_later(await jobs.enqueue(w, 3, "PNG", 10), "w1", 60)
    jobs.forget_dispatches()  # (stepping down: nothing written late)
    jobs.dispatch_later(await jobs.enqueue(w, 4, "PNG", 10), "w1", 60)  # (its timer fires after the one dropped)
    await wait_for_state(store, w.id, 4, "dispatched")
    assert await job_state(store, w.id, 3) == ("queued", 0)


async def wait_for_state(store: Datastore, workload_id: str, image_id: int, state: str) -> None:
    for _ in range(500):
        if (await job_state(store, workload_id, image_id))[0] == state:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"job of image {image_id} never {state}")


async def test_a_job_inserted_on_postgresql_is_announced_whole(request, tmp_path):
    """The notification of a job another server enqueued carries the job as the scheduler reads
    it (no read of its own); one too large to carry says its id; anything else is ignored."""
    import json

    from storage import jobrows
    from storage.postgres import announced

    store = _postgres(request, tmp_path)
    await store.open()
    heard: list[tuple[int, Job | None]] = []
    got = asyncio.Event()
    try:
        listener = await store.listen_jobs(lambda job_id, job: heard.append((job_id, job)) or got.set())
        jobs = JobLifecycle(store)
        w = await store.create_workload("n", "alice", Filter.GRAYSCALE, ("gpu",))
        job = await jobs.enqueue(w, 3, "PNG", 10, (64, 48, "RGB"))
        await asyncio.wait_for(got.wait(), 10)
        (job_id, whole), = heard
        assert job_id == job.id and whole is not None
        (read,) = await store.read(jobrows.queued((job.id,)))
        assert whole == jobrows.job_of(read)  # what the scheduler would have read
        assert whole.original == ("PNG", 64, 48, "RGB") and whole.tags == w.tags
        big = await store.create_workload("b", "alice", Filter.GRAYSCALE, (), params={"note": "x" * 8000})
        got.clear()
        large = await jobs.enqueue(big, 0, "PNG", 10)
        await asyncio.wait_for(got.wait(), 10)
        assert heard[-1] == (large.id, None)  # (read by its id)
        await listener.close()
    finally:
        await store.close()
    assert announced("42") == (42, None)
    for junk in ("", "x", "[1, 2]", '{"id": 1}', json.dumps([-1] + [None] * 12), "[" * 5000):
        assert announced(junk) is None, junk
