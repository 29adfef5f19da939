"""The scheduler: a fair queue of persisted jobs, placed by :func:`placement.place` and carried
to workers over nng req/rep.

A job is a row in the datastore (``queued -> dispatched -> done | failed``). The queue in
memory is rebuilt from those rows at start, so a crash loses nothing. Workloads are served
round-robin, so a huge workload never starves a small one that came after it. A failed attempt
(error reply, timeout, worker death) goes back to the queue with a backoff and a preference
for another worker, until ``max_attempts``; then the job is ``failed`` with the reason.
How an attempt's copies travel (hedged, tied) is :mod:`scheduler.carrier`'s business.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from common.aio import stop_tasks
from common.models import DpipError, Job
from controller.jobs import JobLifecycle
from controller.workers import WorkerInfo
from filtering import pipeline
from scheduler.carrier import (
    Carrier,
    DispatchStats,
    Failure,
    HedgePolicy,
    SchedulerSettings,
)
from scheduler.latency import LatencyTracker
from scheduler.placement import JobView, WorkerView, place, why_not
from scheduler.ports import Members

logger = logging.getLogger(__name__)

#: Longest wait between two attempts that failed because a store was out of reach.
TRANSIENT_BACKOFF_MAX = 5.0
#: How often dispatched jobs that nothing holds are looked for.
ORPHAN_SWEEP = 5.0

__all__ = ["Dispatcher", "HedgePolicy", "SchedulerSettings"]


@dataclass
class Pending:
    """What the scheduler keeps of a job from its queueing until it is settled (done, failed,
    or finished elsewhere): one record, dropped whole."""

    avoid: set[str] = field(default_factory=set)  # workers that failed it already
    not_before: float = 0.0  # monotonic time of its next try
    transient: int = 0  # attempts that failed for the stores' sake (not counted)
    final_by: set[str] = field(default_factory=set)  # workers that said no attempt can help


#: How many settled jobs a scheduler remembers, so that a late notification of one is ignored.
GONE_KEPT = 65_536

class Dispatcher:
    """The scheduling of one term of leadership (:class:`scheduler.leader.LeadingScheduler`
    runs one while this server leads): owns the queue and the jobs in flight, places queued
    jobs and carries them to workers; wakes up on new jobs and on worker news."""

    def __init__(self, jobs: JobLifecycle, membership: Members, settings: SchedulerSettings) -> None:
        self.jobs = jobs
        self.membership = membership
        self.settings = settings
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()  # workload -> jobs, FIFO
        self._pending: dict[int, Pending] = {}  # job id -> its record, while queued or attempted
        self._in_flight: dict[str, dict[int, Job]] = {}  # worker -> job id -> job
        self._finished: OrderedDict[int, float] = OrderedDict()  # job id -> when its call ended (recently)
        self._gone: OrderedDict[int, None] = OrderedDict()  # jobs settled here, the latest GONE_KEPT
        self._probation: dict[str, float] = {}  # worker -> until when others go first
        self.waiting: dict[str, str] = {}  # workload id -> why its next job is not placed
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._turn = 0
        self.latency = LatencyTracker()
        self.stats = DispatchStats()
        self.on_job_done: Callable[[Job, float], None] | None = None  # metrics: job, seconds
        self.carrier = Carrier(jobs, membership, settings, self.latency, self.stats, self)
        self._on_lost = lambda name: self.wake()
        membership.subscribe(on_change=self.wake, on_lost=self._on_lost)

    # -- public -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Requeue what the datastore says is unfinished, then start placing."""
        jobs = await self.jobs.recover()
        for job in jobs:
            self._enqueue(job)
        if jobs:
            logger.info("resumed %d unfinished jobs", len(jobs))
        self._loop_task = asyncio.create_task(self._run(), name="scheduler")
        self.spawn(self._orphans())

    async def close(self) -> None:
        self._closing = True  # nothing new starts: a slot freed by a copy being stopped places nothing
        self.membership.unsubscribe(on_change=self.wake, on_lost=self._on_lost)
        if self._timer is not None:
            self._timer.cancel()
        self.jobs.forget_dispatches()  # (its jobs are queued again by whoever schedules next)
        await stop_tasks([t for t in (self._loop_task, *self._tasks) if t is not None])

    def submit(self, job: Job) -> None:
        """Queue a job that the datastore holds as ``queued``, or soon will (``job.committed``:
        sent as its upload is committed; one that never gets its row leaves the queue then)."""
        self._enqueue(job)
        if job.committed is not None and not job.committed.done():
            job.committed.add_done_callback(lambda done: None if done.result() else self._unstored(job))
        self._place_now()

    def _unstored(self, job: Job) -> None:
        """A job whose upload failed after it was queued: out of the queue if still there
        (one on its way to a worker is dropped by :meth:`_dispatch`)."""
        queue = self._queues.get(job.workload_id)
        if queue is not None and job in queue:
            queue.remove(job)
            if not queue:
                del self._queues[job.workload_id]
            self._settled(job)

    def _place_now(self) -> None:
        """Place at once rather than on the scheduler task's next turn: with many workers
        answering together, each turn of the loop a job waits is time its worker stands idle."""
        if self._loop_task is None:
            self.wake()  # not started: recovery first
        else:
            self._place_what_fits()

    def wake(self) -> None:
        self._wake.set()

    def drop_workload(self, workload_id: str) -> int:
        """A workload is being deleted: its queued jobs leave the queue, its running copies are
        cancelled (their slots free as the workers answer); how many jobs that touched."""
        queued = self._queues.pop(workload_id, deque())
        for job in queued:
            self._settled(job)
        self.waiting.pop(workload_id, None)
        running = 0
        for worker, jobs in self._in_flight.items():
            for job in list(jobs.values()):
                if job.workload_id == workload_id:
                    running += 1
                    self.spawn(self.carrier.cancel(worker, job))
        return len(queued) + running

    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def queued_for(self, tags: frozenset[str] | None) -> int:
        """Queued jobs a worker with ``tags`` could run (None: any worker, tags unknown)."""
        if tags is None:
            return self.queued()
        return sum(1 for q in self._queues.values() for job in q if tags.issuperset(job.tags))

    def slots(self) -> dict[str, tuple[int, int]]:
        """Per worker ready for jobs: (jobs in flight, capacity). The autoscaler reads it."""
        return {v.name: (v.in_flight, v.capacity) for v in self._views() if v.ready}

    def describe(self) -> dict:
        """Policy and counters, for /status."""
        st = self.stats
        return {
            "hedge": self.settings.hedge.value,
            "jobs_done": st.jobs_done,
            "copies_sent": st.copies_sent,
            "copies_started": st.copies_started,
            "hedges": st.hedges,
            "sent_ahead": st.sent_ahead,
        }

    # -- placing ----------------------------------------------------------------------------

    def _enqueue(self, job: Job, retry: bool = False) -> None:
        """Queue a job, unless it is queued or being attempted already (the datastore's recovery
        at start and a submit may name the same job): one attempt at a time per job."""
        if job.id in self._pending and not retry:
            return
        self._pending.setdefault(job.id, Pending())
        self._queues.setdefault(job.workload_id, deque()).append(job)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._place_what_fits()

    def _views(self, members: list[WorkerInfo] | None = None) -> list[WorkerView]:
        """The views of ``members`` (default: every member). Placement passes build them only
        for the workers they can choose (a wide fleet with a backlog frees one slot per job,
        and a pass over 64 views per job cost more than the job's own dispatch)."""
        now = time.monotonic()
        finished = self._finished  # oldest first: prune from the front, O(1) per job
        while finished and now - next(iter(finished.values())) > 5.0:
            # older than any heartbeat that could still report it running
            finished.popitem(last=False)
        views = []
        for w in self.membership.snapshot() if members is None else members:
            ours = self._in_flight.get(w.name, {})
            # Jobs the worker reports that we did not send it (e.g. before a server restart)
            # also take its slots; ours that just ended may still show in a stale heartbeat.
            foreign = {j for j in w.running_job_ids if j not in ours and j not in self._finished}
            views.append(WorkerView(
                name=w.name,
                tags=frozenset(w.tags),
                cpu_percent=w.cpu_percent,
                memory_percent=w.memory_percent,
                gpu_count=w.gpu.count,
                gpu_utilization=w.gpu.utilization_percent,
                in_flight=len(ours) + len(foreign),
                capacity=w.slots(),  # its claim, as far as it has proven it
                ready=w.ready,
                probation=self._probation.get(w.name, 0.0) > now,
                filters=w.filter_names,
                gpu_filters=w.gpu_filters,
                ahead=w.ahead(),
            ))
        return views

    def _has_free_slot(self, w: WorkerInfo) -> bool:
        """(Of a ready worker) fewer of our jobs on it than it is trusted with."""
        return len(self._in_flight.get(w.name, ())) < w.slots()

    def _has_room_ahead(self, w: WorkerInfo) -> bool:
        """(Of a ready worker) its slots taken, and room for a job to wait there for one."""
        held, slots = len(self._in_flight.get(w.name, ())), w.slots()
        return slots <= held < slots + w.ahead()

    def _rotated(self, views: list[WorkerView]) -> dict[str, WorkerView]:
        """By name, rotated, so ties between equal workers go round (one step per job placed,
        not per call: calls come in a fixed number per job, which would alias the turn)."""
        if views:
            turn = self._turn % len(views)
            views = views[turn:] + views[:turn]
        return {v.name: v for v in views}

    def _place_what_fits(self) -> None:
        """Round-robin over workloads: each turn places the head job of the next workload in a
        free slot; then, while the backlog is deep enough (more jobs queued than a round of the
        fleet's slots and the room ahead), jobs are sent ahead to wait on their worker for a
        slot (its prefetch). Views are built only of the workers a pass can choose: with no
        free slot and no room ahead, none (a wide fleet with a backlog wakes the scheduler on
        every heartbeat and every job's end)."""
        if self._closing or not self._queues:
            return  # nothing to place: no views to build (a wide fleet frees a slot per job)
        members = self.membership.snapshot()
        now = time.monotonic()
        next_retry: float | None = None
        ready = [w for w in members if w.ready]
        free = [w for w in ready if self._has_free_slot(w)]
        if free or not ready:  # (nobody ready: the full pass says why)
            next_retry = self._place_round(self._rotated(self._views(free)), now, ahead=False)
        else:
            for wid in self._queues:
                self.waiting.setdefault(wid, "waiting for a free slot")
        queued = self.queued() if self._queues else 0
        if queued >= len(ready) > 0:  # (the fleet has at least a slot per worker ready)
            fleet = sum(w.slots() for w in ready)
            room = [w for w in ready if self._has_room_ahead(w)] if queued >= fleet else []
            if room and queued >= fleet + len(room):
                later = self._place_round(self._rotated(self._views(room)), now, ahead=True, fleet=fleet)
                next_retry = later if next_retry is None else next_retry if later is None else min(next_retry, later)
        if next_retry is not None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, next_retry - time.monotonic()), self.wake
            )

    def _place_round(self, views: dict[str, WorkerView], now: float, ahead: bool, fleet: int = 0) -> float | None:
        """Place head jobs until none fits (``ahead``: in the room workers have beyond their
        slots, and only while more jobs are queued than a whole round of the fleet's slots and
        that room: the jobs of a workload's last round are never sent ahead, so none of them
        waits behind another on one worker while a slot elsewhere is free); when the next job
        held back by its backoff may go."""
        everyone: list[WorkerView] | None = None  # every member's view, to say why nobody fits
        next_retry: float | None = None
        blocked: set[str] = set()
        rooms = len(views)  # (ahead: the workers with room left)
        while True:
            if ahead and self.queued() < fleet + rooms:
                break
            progressed = False
            for wid in list(self._queues):
                if wid in blocked:
                    continue
                queue = self._queues[wid]
                job = queue[0]
                not_before = self._record(job).not_before
                if not_before > now:
                    next_retry = min(next_retry or not_before, not_before)
                    blocked.add(wid)
                    continue
                jv = self._view(job)
                name = place(jv, views.values(), ahead)
                if name is None:
                    if not ahead:
                        if everyone is None:
                            everyone = [views.get(v.name, v) for v in self._views()]
                        self.waiting[wid] = why_not(jv, everyone)
                    blocked.add(wid)
                    continue
                self.waiting.pop(wid, None)
                queue.popleft()
                if not queue:
                    del self._queues[wid]
                else:
                    self._queues.move_to_end(wid)  # fairness: this workload goes to the back
                self._in_flight.setdefault(name, {})[job.id] = job
                self._turn += 1
                v = views[name]
                views[name] = WorkerView(**{**v.__dict__, "in_flight": v.in_flight + 1})
                if v.in_flight >= v.capacity:
                    self.stats.sent_ahead += 1
                    if v.in_flight + 1 >= v.capacity + v.ahead:
                        rooms -= 1
                self.spawn(self._dispatch(job, name, ahead=v.in_flight >= v.capacity))
                progressed = True
                break  # restart the round from the (rotated) front
            if not progressed:
                return next_retry
        return next_retry

    # -- carrying ---------------------------------------------------------------------------

    async def _dispatch(self, job: Job, primary: str, ahead: bool = False) -> None:
        """One attempt of a job: its copies (one, or two with a tail policy), then the outcome.
        A job sent ``ahead`` waits on its worker for a slot: one copy, given twice the timeout
        (every job running there ends within one, so it starts within one)."""
        try:
            if _never_stored(job):
                self._settled(job)  # its upload failed after the job was queued: nothing to run
                return
            # The job travels at once; its transition is written only if it runs a while, else
            # counted by the statement that records its result (dispatch_later).
            timeout = self.settings.job_timeout * (2 if ahead else 1)
            job = self.jobs.dispatch_later(job, primary, timeout)
            t0 = time.monotonic()
            copies = await self.carrier.send(job, primary, ahead)
            outcome, failure = await self.carrier.first_success(copies)
            if job.committed is not None and not await asyncio.shield(job.committed):
                self._settled(job)  # sent while its upload was being committed, which failed:
                return  # no row to record anything in (its result, if any, was not stored)
            if (outcome is None or outcome.result is None) and not await self.jobs.dispatched(job):
                self._settled(job)
                return  # it had finished (or failed for good) meanwhile: nothing to retry
            for name, task in copies.items():
                if (outcome is None or name != outcome.worker) and not task.done():
                    self.spawn(self.carrier.cancel(name, job))  # its slot frees when it answers
                    if outcome is not None and name == primary and self.settings.hedge == HedgePolicy.HEDGED:
                        # A hedge beat it: without probation a slow worker, its slow copies
                        # cancelled, would take ever more jobs and need ever more hedges.
                        self._probation[name] = time.monotonic() + self.settings.probation
            if outcome is not None and outcome.result is not None:
                if not ahead:  # (a job sent ahead waited for a slot: not its latency)
                    self.latency.record(job.size, outcome.answered_at - t0)  # what a hedge waits for
                self.stats.jobs_done += 1
                self.membership.credit(outcome.worker)  # its result is stored: trusted with one more slot
                r = outcome.result
                if not outcome.recorded:
                    await self.jobs.record_timing(job, outcome.worker, r.download_ms, r.process_ms, r.upload_ms)
                self._settled(job)
                if self.on_job_done is not None:
                    self.on_job_done(job, time.monotonic() - t0)
            else:
                await self._attempt_failed(job, primary, failure or Failure("no copy succeeded"))
        except DpipError as e:  # the datastore or the image store out of reach: not the job's fault
            logger.warning("dispatching job %d failed: %s", job.id, e)
            await self._attempt_failed(job, primary, Failure(str(e), transient=True))
        except Exception:  # a bug here must cost one attempt, never the job
            logger.exception("dispatching job %d failed", job.id)
            await self._attempt_failed(job, primary, Failure("internal error while dispatching"))
        finally:
            self.carrier.forget(job.id)
            self.jobs.forget_dispatch(job)
            self.wake()

    def reserve_second(self, job: Job, primary: str) -> str | None:
        """Another worker with a free slot for a second copy (never beyond capacity), reserved."""
        views = [v for v in self._views() if v.name != primary]
        name = place(self._view(job), views)
        if name is not None:
            self._in_flight.setdefault(name, {})[job.id] = job
        return name

    def spawn(self, coro) -> asyncio.Task:
        """Run ``coro`` as a task that close() will stop (once closing, one that never starts)."""
        if self._closing:
            coro.close()
            coro = _nothing()
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def release(self, worker: str, job: Job) -> None:
        """A copy of ``job`` on ``worker`` has ended: its slot is free."""
        self._in_flight.get(worker, {}).pop(job.id, None)
        self._finished[job.id] = time.monotonic()
        self._finished.move_to_end(job.id)  # released twice (reply, then copy's end): keep order
        self._place_now()

    async def _attempt_failed(self, job: Job, worker: str, failure: Failure) -> None:
        try:
            await self._retry_or_fail(job, worker, failure)
        except DpipError as e:  # the datastore is out of reach: keep the job here, try again later
            logger.warning("job %d: could not record its failed attempt (%s); trying it again later", job.id, e)
            self._record(job).not_before = time.monotonic() + TRANSIENT_BACKOFF_MAX
            self._enqueue(job, retry=True)

    async def _retry_or_fail(self, job: Job, worker: str, failure: Failure) -> None:
        record = self._record(job)
        if failure.transient:  # not the job's fault: the attempt does not count
            record.transient += 1
        counted = job.attempts - record.transient
        final = False
        if failure.final:
            # One worker's word never fails a job for good (it may lie, or be broken): a second
            # worker must say so too, else the job is retried elsewhere, within max_attempts.
            record.final_by.add(worker)
            final = len(record.final_by) >= 2
        if final or counted >= self.settings.max_attempts:
            logger.error("job %d (workload %s, image %d) failed for good after %d attempt(s): %s",
                         job.id, job.workload_id, job.image_id, job.attempts, failure.reason)
            await self.jobs.fail(job, failure.reason)
            self._settled(job)
            return
        queued = await self.jobs.retry(job, failure.reason)
        if queued is None:
            self._settled(job)
            return  # its result arrived meanwhile (e.g. the upload beat a lost reply)
        logger.warning("job %d attempt %d on %s failed, retrying: %s",
                       job.id, job.attempts, worker, failure.reason)
        if failure.transient:
            delay = min(TRANSIENT_BACKOFF_MAX, self.settings.retry_backoff * 2 ** (record.transient - 1))
        else:
            record.avoid.add(worker)
            delay = self.settings.retry_backoff * 2 ** (counted - 1) if failure.backoff else 0.0
        record.not_before = time.monotonic() + delay
        self._enqueue(queued, retry=True)

    async def _orphans(self) -> None:
        """Every few seconds: jobs the datastore says are dispatched, past their deadline, that
        no attempt of ours holds (a write lost in a datastore outage) go back in line."""
        while True:
            await asyncio.sleep(ORPHAN_SWEEP)
            try:
                for job in await self.jobs.overdue(exclude=set(self._pending)):
                    logger.warning("job %d was dispatched but nothing holds it: queued again", job.id)
                    self._enqueue(job)
                self._place_now()
            except DpipError as e:
                logger.warning("looking for orphaned jobs failed: %s", e)

    def _record(self, job: Job) -> Pending:
        return self._pending.setdefault(job.id, Pending())

    def _view(self, job: Job) -> JobView:
        record = self._pending.get(job.id)
        return JobView(frozenset(job.tags), frozenset(record.avoid) if record else frozenset(),
                       needs=needed_filters(job.filter.value))

    def _settled(self, job: Job) -> None:
        """The job left the scheduler for good (done, failed, or finished elsewhere)."""
        self._pending.pop(job.id, None)
        self._gone[job.id] = None
        while len(self._gone) > GONE_KEPT:
            self._gone.popitem(last=False)

    def submit_announced(self, job: Job) -> None:
        """:meth:`submit` a job as its notification carried it, unless this scheduler holds it
        or has settled it already (a notification arrives when it arrives: this server's own
        upload may have been scheduled and done before it came)."""
        if job.id not in self._pending and job.id not in self._gone:
            self.submit(job)


@functools.lru_cache(maxsize=4096)
def needed_filters(filter_: str) -> frozenset[str]:
    """The filters a job's pipeline (its stored filter) needs its worker to run."""
    try:
        return frozenset(name for name, _ in pipeline.of_stored(filter_, {}))
    except pipeline.PipelineError:
        return frozenset({filter_})  # nobody runs it: it waits, saying so


async def _nothing() -> None:
    """What a task spawned while the scheduler closes runs instead."""


def _never_stored(job: Job) -> bool:
    """A job sent as its upload was being committed (JobLifecycle.accept_original) whose
    commit is known to have failed."""
    c = job.committed
    return c is not None and c.done() and not c.result()
