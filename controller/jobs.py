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

Each transition is one transaction, all or nothing (:meth:`Datastore.write`: a script of
:mod:`storage.sql`, the same on every engine; on SQLite committed together with the others
waiting at that moment, each in its own savepoint), whose guard is in its SQL (``WHERE state = ?``),
and returns a frozen :class:`~common.models.Job` snapshot, or None when the guard says the
job had moved on meanwhile (its result arrived while a retry was being decided, ...). The
upload handler and the scheduler change jobs only through this module; ``complete`` is the
only way to ``done`` and is driven by the result being stored, never by what a worker says.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, NamedTuple

import aiorwlock

from common.models import (
    BadInput,
    ImageType,
    InsufficientStorage,
    Job,
    JobState,
    NotFound,
    QuotaExceeded,
    Workload,
    quoted,
)
from controller.imageids import image_ids
from controller.results import expected, result_problem
from imaging.facts import header_from_bytes
from storage.datastore import Datastore
from storage.groupwrite import FileWrite
from storage.images import Download, ImageStore, ReceivedImage, image_key
from storage import jobrows
from storage.jobrows import GONE, RECORDED



#: A dispatch is written once its job has run this long (seconds) without ending: a job that
#: ends sooner has its dispatch counted by the statement that records its result (one write per
#: job instead of two). Its row says ``queued`` meanwhile; a takeover requeues either.
DISPATCH_WRITE_DELAY = 0.25


#: The longest a view waits for results being recorded (JobLifecycle.landed): one group commit
#: takes a few ms; a disk that stalls longer holds no reader beyond this.
LANDING_WAIT = 0.25


@dataclasses.dataclass
class _Sent:
    """A dispatch not written yet (:meth:`JobLifecycle.dispatch_later`)."""

    job_id: int
    worker: str
    at: float
    deadline: float
    timer: asyncio.TimerHandle | None = None
    write: asyncio.Future[bool] | None = None  # once begun

    @property
    def counted(self) -> bool:
        """Among its workload's running jobs that the datastore does not show yet (written
        later, not begun)."""
        return self.timer is not None and self.write is None


class Timing(NamedTuple):
    """Which copy of a job won, and where its time went."""

    worker: str
    download_ms: float
    process_ms: float
    upload_ms: float


@dataclasses.dataclass
class JobTraffic:
    """Image bytes this server relayed for jobs (originals to workers, results from them):
    about none when workers use an object store directly."""

    to_workers: int = 0
    from_workers: int = 0
    discarded: int = 0  # results another copy's beat (dropped)


def _retrieved(write: asyncio.Future) -> None:
    """A dispatch's write ended: its failure is the attempt's to hear (:meth:`JobLifecycle.dispatched`)."""
    if not write.cancelled():
        write.exception()


class JobLifecycle:
    """Transitions of persisted jobs (see the module's diagram)."""

    def __init__(self, store: Datastore, images: ImageStore | None = None) -> None:
        self.store = store
        self.images = images
        self.traffic = JobTraffic()
        self.ids = image_ids(store)  # the originals' ids
        self._gates: dict[str, aiorwlock.RWLock] = {}
        self._image_locks: dict[tuple[str, int], tuple[asyncio.Lock, int]] = {}  # -> (lock, holders and waiters)
        self._deleted: OrderedDict[str, float] = OrderedDict()  # workloads deleted here, recently
        self._sent: dict[tuple[str, int], _Sent] = {}  # (workload, image) -> its job's dispatch, unwritten
        self._started: OrderedDict[str, None] = OrderedDict()  # workloads whose first dispatch was written here
        self._unwritten: dict[str, int] = {}  # workload -> its jobs running whose dispatch is not written
        self._landing: dict[str, set[asyncio.Future[None]]] = {}  # workload -> results being recorded
        #: originals up to this size are sent to a worker while their row is being committed
        #: (:meth:`enqueue`): those that travel with their job (0: none; the server sets it)
        self.send_early_bytes = 0
        #: what a worker declared it runs (set by the server: membership's view), by worker name;
        #: a result of a filter this server lacks is judged by its own worker's declaration
        self.declarations: Callable[[str], Mapping[str, Any] | None] = lambda worker: None

    def _gate(self, workload_id: str) -> aiorwlock.RWLock:
        gate = self._gates.get(workload_id)
        if gate is None:
            gate = self._gates[workload_id] = aiorwlock.RWLock(fast=True)
        return gate

    def alone(self, workload_id: str) -> Any:
        """Held by a delete of the workload: no result or thumbnail of it is being placed
        meanwhile (they wait, and see it deleted)."""
        return self._gate(workload_id).writer_lock

    def among_others(self, workload_id: str) -> Any:
        """Held while placing a result or a thumbnail of the workload: any number at once (a
        burst of results goes to the disk and the datastore in one group each, not one at a
        time), never during its delete."""
        return self._gate(workload_id).reader_lock

    @contextlib.asynccontextmanager
    async def result_turn(self, workload_id: str, image_id: int) -> AsyncIterator[None]:
        """Placing a result of one image: its copies one after the other (the first recorded
        wins; a file a crash left is replaced only by the result that gets the row), other
        images of the workload meanwhile."""
        async with self.among_others(workload_id):
            key = (workload_id, image_id)
            lock, users = self._image_locks.get(key) or (asyncio.Lock(), 0)
            self._image_locks[key] = (lock, users + 1)
            try:
                async with lock:
                    yield
            finally:
                lock, users = self._image_locks[key]
                if users == 1:
                    del self._image_locks[key]
                else:
                    self._image_locks[key] = (lock, users - 1)

    async def enqueue(self, workload: Workload, image_id: int, fmt: str, size: int,
                      header: tuple[int, int, str] | None = None, filename: str | None = None,
                      photo: dict | None = None, quota: int = 0, files: Sequence[FileWrite] = (),
                      send: Callable[[Job], None] | None = None, job_id: int | None = None) -> Job:
        """An original is in place: record it (with its ``header``: width, height, mode; the
        name it was uploaded as; what its EXIF says) and queue its job, all or nothing. With a
        ``quota``, its owner's images must fit, checked in the same transaction as the row that
        counts it (concurrent uploads cannot all pass one check). ``files``: its file, written
        just before (in the same trip, where the datastore can). ``send``: where the job goes
        (the scheduler), once its row is committed; or, with a ``job_id`` the datastore reserved
        (:meth:`~storage.sqlite.SqliteDatastore.reserve_job_id`), as its transaction is put in
        line: the worker filters the image while the file and row are synced (its bytes travel
        with it, from memory). Every later write about the job is applied after that transaction
        (one writer, in order), and its result is recorded only once ``job.committed`` says the
        row is there (False: it never will be; the job is dropped wherever it is)."""
        width, height, mode = header or (None, None, None)
        facts = json.dumps(photo) if photo else None
        script = jobrows.enqueue(workload, image_id, fmt, size, time.time(), width, height, mode, filename, facts,
                                 quota, job_id=job_id)
        written: asyncio.Future[int] | None = None
        committed: asyncio.Future[bool] | None = None
        if job_id is not None and send is not None:
            written = self.store.write_queued(script, files)
            committed = asyncio.get_running_loop().create_future()

            def settle(f: asyncio.Future) -> None:  # (also if the upload's request is cancelled meanwhile)
                assert committed is not None
                if not committed.done():
                    committed.set_result(not f.cancelled() and f.exception() is None)
            written.add_done_callback(settle)
        else:
            job_id = await (self.store.write_with_files(script, files) if files else self.store.write(script))
        assert job_id is not None
        job = Job(job_id, workload.id, image_id, workload.filter, workload.tags, size=size,
                  params=workload.params, workload_dir=workload.dir,
                  original=(fmt, width, height, mode) if header else None, committed=committed)
        if send is not None:
            send(job)
        if written is not None:
            await asyncio.shield(written)
        return job

    async def accept_original(self, workload: Workload, stored: ReceivedImage, chosen: int | None,
                              filename: str | None = None, quota: int = 0,
                              send: Callable[[Job], None] | None = None) -> Job:
        """A received original: given the workload's next id (or the ``chosen`` one, the CLI's
        frame number), put in place, recorded, and its job queued. The file is in place before
        its row; ids follow arrival order. ``send``: where the job goes as soon as it may (the
        scheduler), called before this returns; for an image small enough to travel with its
        job, while its file and row are being synced (:meth:`enqueue`)."""
        assert self.images is not None
        if chosen is None:
            image_id = await self.ids.take(workload.id)
        else:
            image_id = await self.ids.choose(workload.id, chosen)
        try:
            return await self._place_original(workload, image_id, stored, filename, quota, send)
        except asyncio.CancelledError:
            self.ids.cancelled(workload.id, image_id)
            raise
        except BaseException:
            await self.ids.give_back(workload.id, image_id)
            raise
        finally:
            self.ids.placed(workload.id, image_id)

    async def _place_original(self, workload: Workload, image_id: int, stored: ReceivedImage,
                              filename: str | None, quota: int, send: Callable[[Job], None] | None = None) -> Job:
        """The file first, then its row; an upload that loses to a delete of its workload
        (between the two), or to its owner's quota, takes its file away again."""
        assert self.images is not None
        if self.deleted(workload.id):
            raise NotFound(f"workload {quoted(workload.id)} not found (deleted meanwhile)")
        key = image_key(workload.dir, ImageType.ORIGINAL, image_id, stored.format)
        # In memory (a small one): written and synced by the datastore's thread just before its
        # row, one trip for both; else moved into place first.
        write = self.images.prepared(stored, key, keep=True)
        if write is None:
            await self.images.commit(stored, key, keep=True)
        try:
            reserve = getattr(self.store, "reserve_job_id", None)  # (SQLite: ids known before the row)
            early = send is not None and write is not None and reserve is not None \
                and stored.size <= self.send_early_bytes  # (its bytes in memory, to travel with it)
            return await self.enqueue(workload, image_id, stored.format, stored.size,
                                      (stored.width, stored.height, stored.mode), filename, stored.photo, quota,
                                      files=(write,) if write is not None else (), send=send,
                                      job_id=reserve() if early else None)
        except (NotFound, QuotaExceeded):
            await self.images.remove(key)
            raise
        except BaseException:
            self.images.forget(key)  # (its file could not be written: its bytes go too)
            raise

    async def dispatch(self, job: Job, worker: str, timeout: float) -> Job | None:
        """queued -> dispatched on ``worker`` (one more attempt, a deadline)."""
        now = time.time()
        changed = await self.store.write(jobrows.dispatch(job.id, worker, now, now + timeout), durable=False)
        return self.as_dispatched(job) if changed else None

    def dispatch_later(self, job: Job, worker: str, timeout: float) -> Job:
        """:meth:`dispatch`, written only if the job is still running ``DISPATCH_WRITE_DELAY``
        later, or before another transition of it (:meth:`dispatched`); a job whose result is
        recorded sooner has its dispatch counted in the same statement. The dispatched snapshot."""
        now = time.time()
        key = (job.workload_id, job.image_id)
        self.forget_dispatch(job)  # (one attempt at a time: none should be left)
        sent = self._sent[key] = _Sent(job.id, worker, now, now + timeout)
        if job.workload_id in self._started:
            sent.timer = asyncio.get_running_loop().call_later(DISPATCH_WRITE_DELAY, self._write_sent, key)
            self._count(job.workload_id, 1)
        else:  # a workload's first job here is written at once: it says "running" as it starts
            self._started[job.workload_id] = None
            while len(self._started) > 4096:
                self._started.popitem(last=False)
            self._write_sent(key)
        return self.as_dispatched(job)

    def _count(self, workload_id: str, n: int) -> None:
        left = self._unwritten.get(workload_id, 0) + n
        if left > 0:
            self._unwritten[workload_id] = left
        else:
            self._unwritten.pop(workload_id, None)

    def running_unwritten(self, workload_id: str) -> int:
        """The workload's jobs running whose dispatch is not written yet: what its view adds to
        the datastore's count of running jobs (on the server that schedules)."""
        return self._unwritten.get(workload_id, 0)

    def _write_sent(self, key: tuple[str, int]) -> None:
        sent = self._sent.get(key)
        if sent is not None and sent.write is None:
            if sent.counted:
                self._count(key[0], -1)
            sent.write = asyncio.ensure_future(self.store.write(
                jobrows.dispatch(sent.job_id, sent.worker, sent.at, sent.deadline), durable=False))
            sent.write.add_done_callback(_retrieved)

    async def dispatched(self, job: Job) -> bool:
        """The job's dispatch (:meth:`dispatch_later`) written, now if it was not yet: whether it
        found the job queued (False: it had ended meanwhile). Before any other transition of a
        job whose attempt did not end with a result."""
        key = (job.workload_id, job.image_id)
        sent = self._sent.get(key)
        if sent is None:
            return True  # counted with its result
        self._write_sent(key)
        try:
            assert sent.write is not None
            return await asyncio.shield(sent.write)
        finally:
            self.forget_dispatch(job)

    def forget_dispatch(self, job: Job) -> None:
        """Whatever is left of the job's dispatch once its attempt is over (a write begun goes on)."""
        self._drop((job.workload_id, job.image_id))

    def _drop(self, key: tuple[str, int]) -> _Sent | None:
        """The image's dispatch taken out (its timer stopped, no longer counted), if any."""
        sent = self._sent.pop(key, None)
        if sent is not None and sent.timer is not None:
            if sent.counted:
                self._count(key[0], -1)
            sent.timer.cancel()
        return sent

    def forget_dispatches(self) -> None:
        """Every dispatch not written yet is dropped (this server stops scheduling: their jobs
        are queued again by whoever schedules next, and no late write may mark them dispatched)."""
        for sent in self._sent.values():
            if sent.timer is not None:
                sent.timer.cancel()
        self._sent.clear()
        self._unwritten.clear()

    async def _unwritten_dispatch(self, workload_id: str, image_id: int) -> _Sent | None:
        """For the statement recording the image's result: its job's dispatch if not written
        (then it is counted there), else None once its write (if begun) has landed."""
        key = (workload_id, image_id)
        sent = self._sent.get(key)
        if sent is None:
            return None
        if sent.write is None:
            return self._drop(key)
        with contextlib.suppress(Exception):
            await asyncio.shield(sent.write)  # (the result lands after it, as the order of transitions goes)
        return None

    @staticmethod
    def as_dispatched(job: Job) -> Job:
        """The snapshot :meth:`dispatch` returns, for a caller that sends the job while the
        transition is being written."""
        return dataclasses.replace(job, attempts=job.attempts + 1, state=JobState.DISPATCHED)

    async def add_copy(self, job: Job) -> None:
        """One more copy of a dispatched job was sent (hedged or tied)."""
        await self.store.write(jobrows.add_copy(job.id), durable=False)

    async def complete(self, workload_id: str, image_id: int, fmt: str, size: int,
                       timing: Timing | None = None) -> bool:
        """A result is in place: record it and mark its job done (a stored result wins even
        over a failure decided meanwhile), with the winning copy's ``timing`` when it is known
        already. False if one was recorded already (the first wins) or its workload is gone."""
        return await self._record_result_row(workload_id, image_id, fmt, size, timing) == RECORDED

    async def _record_result_row(self, workload_id: str, image_id: int, fmt: str, size: int,
                                 timing: Timing | None, files: Sequence[FileWrite] = ()) -> str:
        """:meth:`complete`, saying which: RECORDED, DUPLICATE or GONE (no such workload);
        ``files``: the result's file, written just before (see :meth:`enqueue`)."""
        # Not waiting for the disk: a result lost with a crash (its row or its file) is made
        # again from its original (its job is still dispatched, or redo_lost_results finds it).
        record = jobrows.record_result_at_once if self.store.modifying_ctes else jobrows.record_result
        sent = await self._unwritten_dispatch(workload_id, image_id)
        script = record(workload_id, image_id, fmt, size, time.time(), timing,
                        (sent.worker, sent.at, sent.deadline) if sent is not None else None)
        try:
            if files:
                return await self.store.write_with_files(script, files, durable=False)
            return await self.store.write(script, durable=False)
        except BaseException:
            if sent is not None and (workload_id, image_id) not in self._sent:  # not counted: the
                self._sent[(workload_id, image_id)] = sent  # attempt's failure writes it (dispatched())
                if sent.counted:
                    self._count(workload_id, 1)
            raise

    async def has_result(self, job: Job) -> bool:
        """Whether the job's result is stored: what "done" means, whatever a worker says."""
        return await self.store.has_image(job.workload_id, job.image_id, ImageType.FILTERED)

    async def record_timing(self, job: Job, worker: str, download_ms: float, process_ms: float,
                            upload_ms: float) -> None:
        """Which copy won, and where its time went (the job is ``done`` already)."""
        await self.store.write(jobrows.record_timing(job.id, worker, download_ms, process_ms, upload_ms), durable=False)

    async def retry(self, job: Job, error: str) -> Job | None:
        """dispatched -> queued after a failed attempt; None if it finished meanwhile."""
        if not await self.store.write(jobrows.retry(job.id, error), durable=False):
            return None
        return dataclasses.replace(job, state=JobState.QUEUED)

    async def fail(self, job: Job, error: str) -> Job | None:
        """-> failed for good, with the reason; None if it was done meanwhile."""
        if not await self.store.write(jobrows.fail(job.id, error, time.time())):
            return None
        return dataclasses.replace(job, state=JobState.FAILED)

    async def redo_lost_results(self, limit: int = 100_000) -> int:
        """At start: results recorded while the image store may not have had them on disk yet
        (written unsynced, then a crash: :attr:`ImageStore.unsure_since`) whose file is missing
        or short are dropped, and their jobs queued again; how many."""
        assert self.images is not None
        since = self.images.unsure_since
        if since is None:
            return 0
        rows = await self.store.read(jobrows.recent_results(since - 1.0, limit))

        def lost() -> list[tuple[str, int, str]]:
            keys = ((wid, image_id, image_key(wdir, ImageType.FILTERED, image_id, fmt), size)
                    for wid, wdir, image_id, fmt, size in rows)
            return [(wid, image_id, key) for wid, image_id, key, size in keys if not self.images.intact(key, size)]

        missing = await asyncio.to_thread(lost)
        for wid, image_id, key in missing:
            await self.images.remove(key)  # what is left of it would win over the result made again
            await self.store.write(jobrows.redo_result(wid, image_id))
        return len(missing)

    async def recover(self) -> list[Job]:
        """At the start of scheduling (a start, a takeover): jobs dispatched before (by a
        server that crashed, or lost the lead) go back to queued; every queued job, oldest
        first, is returned to be scheduled again."""
        return [jobrows.job_of(r) for r in await self.store.write(jobrows.recover())]

    async def queued(self, ids: list[int] | tuple[int, ...] = (), after: int = -1, limit: int = 1000) -> list[Job]:
        """Queued jobs (those of ``ids``, or the first ``limit`` of id above ``after``), oldest
        first: what another server enqueued, for the one that schedules."""
        rows = await self.store.read(jobrows.queued(tuple(ids), after, limit))
        return [jobrows.job_of(r) for r in rows]

    async def delete_workload(self, workload: Workload) -> dict | None:
        """Remove a workload for good: its rows (jobs, images, the workload) in one transaction,
        then its images (files or objects, thumbnails too); what was removed, or None if it was
        gone already. Results of its jobs still in flight are dropped when they come back."""
        assert self.images is not None
        self._deleted[workload.id] = time.monotonic()
        while len(self._deleted) > 10_000:
            self._deleted.popitem(last=False)
        files = None
        try:
            async with self.alone(workload.id):  # no result of it is being placed meanwhile
                try:
                    removed = await self.store.delete_workload(workload.id)
                except InsufficientStorage:
                    # A full disk: even a delete needs room in the datastore's log. Its files go
                    # first (it is being deleted: nothing will read them), then its rows.
                    files = await self.images.remove_workload(workload.dir)
                    removed = await self.store.delete_workload(workload.id)
        except BaseException:
            self._deleted.pop(workload.id, None)  # it still exists: its results still count
            raise
        if removed is None:
            return None
        removed["files"] = (files or 0) + await self.images.remove_workload(workload.dir)
        self.ids.forget(workload.id)
        self._gates.pop(workload.id, None)
        return removed

    async def thumbnail(self, workload: Workload, type_: ImageType, image_id: int, fmt: str, size: str) -> str:
        """The key of an image's thumbnail, made on first request (by the owner's share of the
        thumbnail threads). A delete of the workload while it is being made wins: nothing is
        written for it (this server's deletes are seen under the workload's lock; another
        server's by the row, checked again after the write)."""
        assert self.images is not None

        @contextlib.asynccontextmanager
        async def still_there() -> AsyncIterator[bool]:
            async with self.among_others(workload.id):
                yield not self.deleted(workload.id) and await self._exists(workload.id)

        key = await self.images.thumbnail(workload.dir, type_, image_id, fmt, size, workload.owner, still_there)
        if self.store.shared and not await self._exists(workload.id):
            await self.images.remove(key)
            raise NotFound(f"{type_.value} image {image_id} not found (its workload was deleted)")
        return key

    async def _exists(self, workload_id: str) -> bool:
        return await self.store.read(jobrows.workload_exists(workload_id))

    def deleted(self, workload_id: str) -> bool:
        """Whether this server deleted the workload recently (its late results are dropped)."""
        return workload_id in self._deleted

    async def overdue(self, exclude: set[int], limit: int = 1000) -> list[Job]:
        """Dispatched jobs past their deadline not among ``exclude`` (the attempts the scheduler
        holds), put back to queued: their dispatch was recorded but nothing carries them."""
        return [jobrows.job_of(r) for r in await self.store.write(jobrows.overdue(exclude, time.time(), limit))]

    # -- results ----------------------------------------------------------------------------

    async def accept_result(self, workload_id: str, workload_dir: str, filter_name: str, image_id: int,
                            original: tuple[str, int, int, str] | None, stored: ReceivedImage,
                            timing: Timing | None = None, params: dict | None = None, worker: str = "",
                            sole: Callable[[], bool] = lambda: False) -> bool:
        """A received result: judged against its ``original`` (format, size, mode; read from the
        image if the row predates headers), put in place and recorded. BadInput if it cannot be
        the job's result; False if another result was first (this one is dropped)."""
        assert self.images is not None
        original = await self._original_header(workload_id, workload_dir, image_id, original)
        declared = self.declarations(worker or (timing.worker if timing else ""))
        problem = result_problem(filter_name, original, stored, params, declared)
        if problem:
            raise BadInput(f"result rejected: {problem}")
        stored = await self.images.without_metadata(stored)  # whatever the worker put in
        key = image_key(workload_dir, ImageType.FILTERED, image_id, stored.format)
        async with self.result_turn(workload_id, image_id):  # first result wins; a late or duplicate one changes nothing
            if self.deleted(workload_id):
                return False  # its workload was deleted while the job ran
            if self.images.whole_writes:
                # An object store: whether a copy's result was recorded first is the datastore's
                # word (copies of an image take turns here), asked of it instead of the store (a
                # HEAD cost the server 1.4 ms of CPU, a row's read a fraction); this one replaces
                # whatever a crash may have left without a row. Not even asked for the only copy
                # of a first attempt (``sole()``, asked in this turn: a copy sent after it waits for
                # the turn and then asks): no other result of the job exists anywhere.
                if not sole() and await self.store.has_image(workload_id, image_id, ImageType.FILTERED):
                    self.traffic.discarded += 1
                    return False
            # Not synced one by one: a result lost with a crash is made again (redo_lost_results).
            # In memory: the file and its row in one trip to the datastore's thread.
            write = self.images.prepared(stored, key, replace=self.images.whole_writes, durable=False)
            if write is None:
                placed = await self.images.commit(stored, key, replace=self.images.whole_writes, durable=False)
            outcome = await self._record_result_row(workload_id, image_id, stored.format, stored.size, timing,
                                                    (write,) if write is not None else ())
            if write is not None:
                placed = write.placed
            if outcome == GONE and placed:  # deleted meanwhile (by another server): take it away
                await self.images.remove(key)
            elif outcome == RECORDED and not placed and stored.data is not None:
                # A file without a row: what a crash left of an earlier copy's result written
                # unsynced (perhaps only part of it). The row now counts this one: its bytes
                # replace those. (A streamed result is synced before it is placed: whole.)
                await self.images.commit(stored, key, replace=True, durable=False)
            self.traffic.discarded += outcome != RECORDED
            return outcome == RECORDED

    async def accept_uploaded_result(self, workload: Workload, image_id: int, stored: ReceivedImage,
                                     worker: str = "") -> bool:
        """A result a worker uploaded over HTTP (with its job's capability): judged against its
        original, stored and recorded (see :meth:`accept_result`)."""
        try:
            header = await self.store.image_header(workload.id, image_id, ImageType.ORIGINAL)
        except NotFound as e:
            raise BadInput(f"workload has no original image {image_id}") from e
        self.traffic.from_workers += stored.size
        fmt, width, height, mode = header
        known = (fmt, width, height, mode) if width is not None and height is not None and mode is not None \
            else None  # a row of an earlier version: read from the image
        return await self.accept_result(workload.id, workload.dir, workload.filter.value, image_id, known, stored,
                                        params=workload.params, worker=worker)

    def sent_to_worker(self, download: Download) -> None:
        """A worker fetched its job's original through the API."""
        self.traffic.to_workers += download.size or (download.path.stat().st_size if download.path else 0)

    async def _original_header(self, workload_id: str, workload_dir: str, image_id: int,
                               original: tuple[str, int, int, str] | None) -> tuple[str, int, int, str]:
        if original is not None:
            return original
        assert self.images is not None  # stored by an earlier version: read its header from the image
        fmt = (await self.store.image_header(workload_id, image_id, ImageType.ORIGINAL))[0]
        data = await self.images.read(image_key(workload_dir, ImageType.ORIGINAL, image_id, fmt))
        return await asyncio.to_thread(header_from_bytes, data)

    def _original_key(self, job: Job) -> str:
        assert job.original is not None
        return image_key(job.workload_dir, ImageType.ORIGINAL, job.image_id, job.original[0])

    async def inline_original(self, job: Job, limit: int) -> bytes | None:
        """The job's original if it is at most ``limit`` bytes (to send with the job), else None."""
        if self.images is None or job.original is None:
            return None
        try:
            data = await self.images.small_file(self._original_key(job), job.size, limit)
        except OSError:
            return None  # the worker downloads it, and hears why it cannot
        if data is not None:
            self.traffic.to_workers += len(data)
        return data

    @contextlib.contextmanager
    def landing(self, workload_id: str) -> Any:
        """Around the recording of a result this server has received (:meth:`landed` waits for it)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._landing.setdefault(workload_id, set()).add(done)
        try:
            yield
        finally:
            done.set_result(None)
            futures = self._landing.get(workload_id)
            if futures is not None:
                futures.discard(done)
                if not futures:
                    del self._landing[workload_id]

    async def landed(self, workload_id: str, timeout: float = LANDING_WAIT) -> None:
        """Once every result of the workload this server had received by now is recorded (or
        failed to be), at most ``timeout``: what a view read next shows includes them. (A client
        polling for its image sees the result the worker already sent, not the poll after.)"""
        futures = self._landing.get(workload_id)
        if futures:
            await asyncio.wait(set(futures), timeout=timeout)

    def original_in_memory(self, job: Job) -> bool:
        """Whether the job's original is in memory (no read of its file needed to send it)."""
        return self.images is not None and job.original is not None and self.images.remembered(self._original_key(job))

    async def direct_urls(self, job: Job, expires_in: float, worker: str = "") -> tuple[str, str] | None:
        """Where the worker gets the original and puts the result itself (an object store's
        presigned URLs, for this job only), or None: through the API."""
        if self.images is None or not self.images.direct or job.original is None:
            return None
        return await self.images.job_urls(self._original_key(job), self._result_key(job, worker), expires_in)

    def _result_key(self, job: Job, worker: str) -> str:
        """Where ``worker`` puts the job's result in an object store: named in the format its
        pipeline makes."""
        assert job.original is not None
        fmt = expected(job.filter.value, job.params, job.original, self.declarations(worker)).format
        return image_key(job.workload_dir, ImageType.FILTERED, job.image_id, fmt)

    async def store_inline_result(self, job: Job, data: bytes, timing: Timing,
                                  sole: Callable[[], bool] = lambda: False) -> None:
        """A result that came back inside the job's reply: stored as an upload would be, with
        the copy's ``timing``; the original's bytes are no longer needed in memory. BadInput if
        it cannot be the result. ``sole()``: whether this is the only copy of the job's first
        attempt (then no other result of it can have been recorded: see :meth:`accept_result`)."""
        assert self.images is not None
        self.traffic.from_workers += len(data)
        stored = await self.images.receive_bytes(data)
        try:
            await self.accept_result(job.workload_id, job.workload_dir, job.filter.value, job.image_id,
                                     job.original, stored, timing, job.params, sole=sole)
        finally:
            await self.images.discard(stored)
        if job.original is not None:
            self.images.forget(self._original_key(job))

    async def accept_direct_result(self, job: Job, timing: Timing) -> str | None:
        """A result the worker put into the object store itself: judged by its header as an
        upload would be and recorded; why it cannot be the result, or None once it is recorded
        (or another copy's was first)."""
        assert self.images is not None and job.original is not None
        key = self._result_key(job, timing.worker)
        stored = await self.images.stored_result(key)
        if stored is None:
            return "reported success but stored no result"
        original = await self._original_header(job.workload_id, job.workload_dir, job.image_id, job.original)
        problem = result_problem(job.filter.value, original, stored, job.params, self.declarations(timing.worker))
        if problem:
            return f"result rejected: {problem}"
        try:
            stored = await self.images.clean_stored_result(key, stored)
        except BadInput as e:
            return f"result rejected: {e}"
        if await self._record_result_row(job.workload_id, job.image_id, stored.format, stored.size, timing) == GONE:
            await self.images.remove(key)  # its workload was deleted while the job ran
        self.images.forget(self._original_key(job))
        return None
