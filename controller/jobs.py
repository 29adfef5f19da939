"""The job lifecycle: the one place where a job changes state.

```
            enqueue            dispatch             complete
  (upload) ---------> queued ----------> dispatched ----------> done
                        ^                   |   |
                        |      retry        |   |  fail (no attempts left, or final)
                        +-------------------+   +-------------------------------> failed
                        |      recover (at start: dispatched before a crash)
                        +--------------------------------------------------------- dispatched
```

Each transition is one serialized transaction (:meth:`Store.transaction`: BEGIN IMMEDIATE ...
COMMIT under one lock, ROLLBACK on any error; a one-statement transition is that statement alone
under the same lock, :meth:`Store.write`) whose guard is in its SQL (``WHERE state = ?``),
and returns a frozen :class:`~controller.models.Job` snapshot, or None when the guard says the
job had moved on meanwhile (its result arrived while a retry was being decided, ...). The
upload handler and the scheduler change jobs only through this module; ``complete`` is the
only way to ``done`` and is driven by the result being stored, never by what a worker says.
"""

from __future__ import annotations

import dataclasses
import json
import time

from controller.datastore import Datastore
from controller.models import Filter, ImageType, Job, JobState, Workload
from controller.store import tags_of


class JobLifecycle:
    """Transitions of persisted jobs (see the module's diagram)."""

    def __init__(self, store: Datastore) -> None:
        self.store = store

    async def enqueue(self, workload: Workload, image_id: int, fmt: str, size: int,
                      header: tuple[int, int, str] | None = None) -> Job:
        """An original is in place: record it (with its ``header``: width, height, mode) and
        queue its job, all or nothing."""
        width, height, mode = header or (None, None, None)
        now = time.time()
        async with self.store.transaction() as db:
            await db.execute(
                "UPDATE workloads SET next_image_id = MAX(next_image_id, ?) WHERE id = ?",
                (image_id + 1, workload.id),
            )
            await db.execute(
                "INSERT INTO images(workload_id, image_id, type, format, size, created_at,"
                " width, height, mode) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (workload.id, image_id, ImageType.ORIGINAL.value, fmt, size, now, width, height, mode),
            )
            cur = await db.execute(
                "INSERT INTO jobs(workload_id, image_id, state, created_at) VALUES (?, ?, ?, ?)",
                (workload.id, image_id, JobState.QUEUED.value, now),
            )
            job_id = cur.lastrowid
        assert job_id is not None
        return Job(job_id, workload.id, image_id, workload.filter, workload.tags, size=size,
                   params=workload.params)

    async def dispatch(self, job: Job, worker: str, timeout: float) -> Job | None:
        """queued -> dispatched on ``worker`` (one more attempt, a deadline)."""
        now = time.time()
        cur = await self.store.write(
            "UPDATE jobs SET state = ?, worker = ?, attempts = attempts + 1, dispatched_at = ?,"
            " deadline = ?, copies = copies + 1 WHERE id = ? AND state = ?",
            (JobState.DISPATCHED.value, worker, now, now + timeout, job.id, JobState.QUEUED.value),
        )
        if cur.rowcount != 1:
            return None
        return dataclasses.replace(job, attempts=job.attempts + 1, state=JobState.DISPATCHED)

    async def add_copy(self, job: Job) -> None:
        """One more copy of a dispatched job was sent (hedged or tied)."""
        await self.store.write("UPDATE jobs SET copies = copies + 1 WHERE id = ?", (job.id,))

    async def complete(self, workload_id: str, image_id: int, fmt: str, size: int) -> bool:
        """A result is in place: record it and mark its job done (a stored result wins even
        over a failure decided meanwhile). False if one was recorded already: the first wins."""
        now = time.time()
        async with self.store.transaction() as db:
            cur = await db.execute(
                "INSERT OR IGNORE INTO images(workload_id, image_id, type, format, size, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (workload_id, image_id, ImageType.FILTERED.value, fmt, size, now),
            )
            if cur.rowcount != 1:
                return False
            await db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error = NULL"
                " WHERE workload_id = ? AND image_id = ?",
                (JobState.DONE.value, now, workload_id, image_id),
            )
        return True

    async def has_result(self, job: Job) -> bool:
        """Whether the job's result is stored: what "done" means, whatever a worker says."""
        return await self.store.has_image(job.workload_id, job.image_id, ImageType.FILTERED)

    async def record_result(self, job: Job, worker: str, download_ms: float, process_ms: float,
                            upload_ms: float) -> None:
        """Which copy won, and where its time went (the job is ``done`` already)."""
        await self.store.write(
            "UPDATE jobs SET worker = ?, download_ms = ?, process_ms = ?, upload_ms = ? WHERE id = ?",
            (worker, download_ms, process_ms, upload_ms, job.id),
        )

    async def retry(self, job: Job, error: str) -> Job | None:
        """dispatched -> queued after a failed attempt; None if it finished meanwhile."""
        cur = await self.store.write(
            "UPDATE jobs SET state = ?, worker = NULL, error = ? WHERE id = ? AND state = ?",
            (JobState.QUEUED.value, error, job.id, JobState.DISPATCHED.value),
        )
        if cur.rowcount != 1:
            return None
        return dataclasses.replace(job, state=JobState.QUEUED)

    async def fail(self, job: Job, error: str) -> Job | None:
        """-> failed for good, with the reason; None if it was done meanwhile."""
        cur = await self.store.write(
            "UPDATE jobs SET state = ?, error = ?, finished_at = ? WHERE id = ? AND state != ?",
            (JobState.FAILED.value, error, time.time(), job.id, JobState.DONE.value),
        )
        if cur.rowcount != 1:
            return None
        return dataclasses.replace(job, state=JobState.FAILED)

    async def recover(self) -> list[Job]:
        """At start: jobs dispatched before a crash go back to queued; every queued job, oldest
        first, is returned to be scheduled again."""
        async with self.store.transaction() as db:
            await db.execute(
                "UPDATE jobs SET state = ?, worker = NULL WHERE state = ?",
                (JobState.QUEUED.value, JobState.DISPATCHED.value),
            )
            async with db.execute(
                "SELECT j.id, j.workload_id, j.image_id, j.attempts, w.filter, w.tags, i.size, w.params"
                " FROM jobs j JOIN workloads w ON w.id = j.workload_id"
                " JOIN images i ON i.workload_id = j.workload_id AND i.image_id = j.image_id"
                " AND i.type = ? WHERE j.state = ? ORDER BY j.id",
                (ImageType.ORIGINAL.value, JobState.QUEUED.value),
            ) as cur:
                rows = await cur.fetchall()
        return [Job(r[0], r[1], r[2], Filter(r[4]), tags_of(r[5]), attempts=r[3], size=r[6],
                    params=json.loads(r[7])) for r in rows]
