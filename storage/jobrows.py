"""The jobs table's SQL, in one place: each job transition (and the quota reservation that goes
with an upload) as a script of :mod:`storage.sql`, the same on every engine, whose guard is in its
SQL (``WHERE state = ?``). :mod:`controller.jobs` runs them, one transaction each."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from common.models import Conflict, Filter, ImageType, Job, JobState, NotFound, QuotaExceeded, quoted
from storage.queries import stored_tags
from storage.sql import Script, one_statement, q

#: How recording a result ended (:func:`record_result`).
RECORDED, DUPLICATE, GONE = "recorded", "duplicate", "gone"


def statement(sql: str, *params: Any) -> Script[bool]:
    """One guarded statement: whether it changed a row."""
    return (yield q(sql, *params)).rowcount == 1


def enqueue(workload: Any, image_id: int, fmt: str, size: int, now: float, width: int | None, height: int | None,
            mode: str | None, filename: str | None, facts: str | None, quota: int,
            job_id: int | None = None) -> Script[int]:
    """An original's row, its workload's next id moved past it, and its queued job (with a
    ``quota``, reserved in the same transaction); the job's id (``job_id`` if given: one the
    datastore reserved, :meth:`~storage.sqlite.SqliteDatastore.reserve_job_id`)."""
    if quota:
        yield from reserve_quota(workload.owner, size, quota)
    if (yield q("UPDATE workloads SET next_image_id = CASE WHEN next_image_id > ? THEN next_image_id"
                " ELSE ? END WHERE id = ?", image_id, image_id + 1, workload.id)).rowcount != 1:
        raise NotFound(f"workload {quoted(workload.id)} not found (deleted meanwhile)")
    if (yield q("INSERT INTO images(workload_id, image_id, type, format, size, created_at,"
                " width, height, mode, filename, photo) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING", workload.id, image_id, ImageType.ORIGINAL.value, fmt, size,
                now, width, height, mode, filename, facts)).rowcount != 1:  # another server took that id meanwhile
        raise Conflict(f"original image {image_id} of workload {quoted(workload.id)} already exists")
    if job_id is not None:
        return (yield q("INSERT INTO jobs(id, workload_id, image_id, state, created_at) VALUES (?, ?, ?, ?, ?)"
                        " RETURNING id", job_id, workload.id, image_id, JobState.QUEUED.value, now)).scalar()
    return (yield q("INSERT INTO jobs(workload_id, image_id, state, created_at) VALUES (?, ?, ?, ?)"
                    " RETURNING id", workload.id, image_id, JobState.QUEUED.value, now)).scalar()


@one_statement
def dispatch(job_id: int, worker: str, now: float, deadline: float) -> Script[bool]:
    """queued -> dispatched on ``worker``: one more attempt and copy, a deadline."""
    return (yield from statement(
        "UPDATE jobs SET state = ?, worker = ?, attempts = attempts + 1, dispatched_at = ?, deadline = ?,"
        " copies = copies + 1 WHERE id = ? AND state = ?",
        JobState.DISPATCHED.value, worker, now, deadline, job_id, JobState.QUEUED.value))


@one_statement
def add_copy(job_id: int) -> Script[bool]:
    return (yield from statement("UPDATE jobs SET copies = copies + 1 WHERE id = ?", job_id))


def _done_sets(now: float, timing: Sequence | None, dispatched: Sequence | None) -> tuple[str, tuple]:
    """The ``SET`` of a job marked done, and its values: with the winning copy's ``timing``
    (worker, download, process, upload), and with its dispatch (worker, time, deadline) when
    that was not written before (:meth:`~controller.jobs.JobLifecycle.dispatch_later`)."""
    sets, values = "state = ?, finished_at = ?, error = NULL", (JobState.DONE.value, now)
    if dispatched is not None:  # (its worker, unless the winning copy's is named below)
        worker, at, deadline = dispatched
        sets += ", attempts = attempts + 1, copies = copies + 1, dispatched_at = ?, deadline = ?"
        values += (at, deadline)
        if timing is None:
            sets += ", worker = ?"
            values += (worker,)
    if timing is not None:
        sets += ", worker = ?, download_ms = ?, process_ms = ?, upload_ms = ?"
        values += tuple(timing)
    return sets, values


def record_result(workload_id: str, image_id: int, fmt: str, size: int, now: float,
                  timing: Sequence | None, dispatched: Sequence | None = None) -> Script[str]:
    """A result's row and its job done (whatever was decided meanwhile), with the winning copy's
    ``timing`` (worker, download, process, upload) if known, and the job's ``dispatched``
    (worker, time, deadline) if it was not written: RECORDED, DUPLICATE or GONE."""
    # The job's row first, then the image's (whose counters take the workload's row): the order
    # of every transition (a job's row, then its workload's), so that two never wait for each
    # other. PostgreSQL found the other order deadlocking with the job's dispatch, which is
    # written while the job travels. A job is done exactly when its result's row exists: the
    # first copy to mark it done is the one recorded.
    sets, values = _done_sets(now, timing, dispatched)
    marked = (yield q(f"UPDATE jobs SET {sets} WHERE workload_id = ? AND image_id = ? AND state <> ?",
                      *values, workload_id, image_id, JobState.DONE.value)).rowcount
    if marked != 1:  # (whether its workload is still there is asked only now: one statement
        # less on the common path, a round trip on PostgreSQL)
        if not (yield q("SELECT 1 FROM workloads WHERE id = ?", workload_id)).rows:
            return GONE  # deleted while its job ran: nothing to record
        return DUPLICATE
    if (yield q("INSERT INTO images(workload_id, image_id, type, format, size, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                workload_id, image_id, ImageType.FILTERED.value, fmt, size, now)).rowcount != 1:
        return DUPLICATE
    return RECORDED


@one_statement
def record_result_at_once(workload_id: str, image_id: int, fmt: str, size: int, now: float,
                          timing: Sequence | None, dispatched: Sequence | None = None) -> Script[str]:
    """:func:`record_result` in one statement, for an engine whose ``WITH`` may modify rows
    (PostgreSQL): the job's row, then the image's (the same order, the same triggers), and
    whether the workload is still there, in one round trip instead of four (a lazy
    transaction's BEGIN and COMMIT, and its two statements)."""
    sets, values = _done_sets(now, timing, dispatched)
    marked, inserted, exists = (yield q(
        f"WITH j AS (UPDATE jobs SET {sets} WHERE workload_id = ? AND image_id = ? AND state <> ? RETURNING 1),"
        " i AS (INSERT INTO images(workload_id, image_id, type, format, size, created_at)"
        " SELECT CAST(? AS TEXT), CAST(? AS INTEGER), CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS BIGINT),"
        " CAST(? AS DOUBLE PRECISION) FROM j ON CONFLICT DO NOTHING RETURNING 1)"
        " SELECT (SELECT COUNT(*) FROM j), (SELECT COUNT(*) FROM i), EXISTS (SELECT 1 FROM workloads WHERE id = ?)",
        *values, workload_id, image_id, JobState.DONE.value,
        workload_id, image_id, ImageType.FILTERED.value, fmt, size, now, workload_id)).one()
    if marked != 1:
        return DUPLICATE if exists else GONE
    return RECORDED if inserted == 1 else DUPLICATE


@one_statement
def record_timing(job_id: int, worker: str, download_ms: float, process_ms: float, upload_ms: float) -> Script[bool]:
    return (yield from statement("UPDATE jobs SET worker = ?, download_ms = ?, process_ms = ?, upload_ms = ?"
                                 " WHERE id = ?", worker, download_ms, process_ms, upload_ms, job_id))


@one_statement
def retry(job_id: int, error: str) -> Script[bool]:
    """dispatched -> queued after a failed attempt."""
    return (yield from statement("UPDATE jobs SET state = ?, worker = NULL, error = ? WHERE id = ? AND state = ?",
                                 JobState.QUEUED.value, error, job_id, JobState.DISPATCHED.value))


def fail(job_id: int, error: str, now: float) -> Script[bool]:
    """-> failed for good, unless done."""
    return (yield from statement("UPDATE jobs SET state = ?, error = ?, finished_at = ? WHERE id = ? AND state != ?",
                                 JobState.FAILED.value, error, now, job_id, JobState.DONE.value))


def recover() -> Script[list]:
    """Every dispatched job back to queued; then every queued job's row, oldest first."""
    yield q("UPDATE jobs SET state = ?, worker = NULL WHERE state = ?", JobState.QUEUED.value,
            JobState.DISPATCHED.value)
    return (yield from queued(()))


def overdue(exclude: set[int], now: float, limit: int) -> Script[list]:
    """Dispatched jobs past their deadline, not among ``exclude``, back to queued; their rows."""
    rows = (yield q("SELECT id FROM jobs WHERE state = ? AND deadline < ? ORDER BY id LIMIT ?",
                    JobState.DISPATCHED.value, now, limit)).rows
    ids = tuple(r[0] for r in rows if r[0] not in exclude)
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    yield q(f"UPDATE jobs SET state = ?, worker = NULL WHERE state = ? AND id IN ({marks})",
            JobState.QUEUED.value, JobState.DISPATCHED.value, *ids)
    return (yield from queued(ids))


@one_statement
def recent_results(since: float, limit: int) -> Script[list]:
    """Results recorded at or after ``since``: (workload id, its directory, image id, format, size)."""
    return (yield q("SELECT i.workload_id, w.dir, i.image_id, i.format, i.size FROM images i JOIN workloads w"
                    " ON w.id = i.workload_id WHERE i.type = ? AND i.created_at >= ? ORDER BY i.created_at LIMIT ?",
                    ImageType.FILTERED.value, since, limit)).rows


def redo_result(workload_id: str, image_id: int) -> Script[bool]:
    """A result lost with a crash: its row goes and its job is queued again (run from its
    original at the next start of scheduling)."""
    yield q("DELETE FROM images WHERE workload_id = ? AND image_id = ? AND type = ?",
            workload_id, image_id, ImageType.FILTERED.value)
    return (yield from statement("UPDATE jobs SET state = ?, worker = NULL, finished_at = NULL WHERE workload_id = ?"
                                 " AND image_id = ?", JobState.QUEUED.value, workload_id, image_id))


@one_statement
def workload_exists(workload_id: str) -> Script[bool]:
    return bool((yield q("SELECT 1 FROM workloads WHERE id = ?", workload_id)).rows)


@one_statement
def queued(ids: tuple[int, ...], after: int = -1, limit: int = 1_000_000) -> Script[list]:
    """Queued jobs' rows (those of ``ids``, or of ids above ``after``), oldest first (:func:`job_of`)."""
    where = f" AND j.id IN ({','.join('?' * len(ids))})" if ids else " AND j.id > ?"
    return (yield q(
        "SELECT j.id, j.workload_id, j.image_id, j.attempts, w.filter, w.tags, i.size, w.params,"
        " w.dir, i.format, i.width, i.height, i.mode FROM jobs j JOIN workloads w ON w.id = j.workload_id"
        " JOIN images i ON i.workload_id = j.workload_id AND i.image_id = j.image_id"
        " AND i.type = ? WHERE j.state = ?" + where + " ORDER BY j.id LIMIT ?",
        ImageType.ORIGINAL.value, JobState.QUEUED.value, *(ids or (after,)), limit)).rows


def job_of(r: Sequence) -> Job:
    """A row of :func:`queued` as a job."""
    return Job(r[0], r[1], r[2], Filter(r[4]), stored_tags(r[5]), attempts=r[3], size=r[6],
               params=json.loads(r[7]), workload_dir=r[8],
               original=(r[9], r[10], r[11], r[12]) if r[12] is not None else None)


def reserve_quota(owner: str, size: int, quota: int) -> Script[None]:
    """In a transaction: :class:`QuotaExceeded` unless the owner's images and ``size`` more fit.
    The owner's row is locked first (a no-op update), so that two uploads of one owner on
    PostgreSQL take turns; SQLite writes one transaction at a time anyway."""
    yield q("UPDATE users SET name = name WHERE name = ?", owner)
    used = int((yield q("SELECT COALESCE(SUM(bytes), 0) FROM workloads WHERE owner = ?", owner)).scalar() or 0)
    if used + size > quota:
        raise quota_exceeded(used, quota, size)


def quota_exceeded(used: int, quota: int, size: int) -> QuotaExceeded:
    return QuotaExceeded(f"quota exceeded: your images take {used} of your {quota} bytes and this one"
                         f" has {size}; delete a workload to make room")
