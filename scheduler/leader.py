"""Exactly one server schedules: the one holding the scheduler's lease in the datastore.

On one SQLite file there is one server, which always schedules. On a shared datastore
(PostgreSQL) every server serves the API and tracks the workers, but only the holder of the
lease ``scheduler`` (TTL ``lease_ttl``, at most 3 s, renewed three times per TTL) runs a
:class:`~scheduler.dispatcher.Dispatcher`: the first server to start takes it; the others try
every sixth of a TTL, so one of them takes over within a TTL and a half of the leader's death.
A new term starts by requeueing what was dispatched (by whoever led before) and then schedules
what is queued; jobs enqueued by other servers reach it by notification, which carries the
job itself (a sweep every few seconds finds one that was missed). A leader that cannot renew before its lease would
expire (by its own clock, with a margin) stops scheduling at once: two never schedule together.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

from common.aio import stop_tasks
from common.models import DpipError, Job
from controller.jobs import JobLifecycle
from scheduler.dispatcher import Dispatcher, SchedulerSettings
from scheduler.ports import Members
from storage.datastore import JobListener, SharedDatastore

logger = logging.getLogger(__name__)

LEASE = "scheduler"
#: A leader stops scheduling this long before its lease would expire by its own clock.
SAFETY_MARGIN = 0.5
#: Queued jobs are looked for this often (notifications are the fast path).
SWEEP_INTERVAL = 3.0


class LeadingScheduler:
    """This server's scheduler while it leads; an empty one while another server does."""

    def __init__(self, jobs: JobLifecycle, membership: Members, settings: SchedulerSettings,
                 name: str, lease_ttl: float = 3.0, shared: SharedDatastore | None = None) -> None:
        """``shared``: the datastore other servers share, whose lease says who schedules; None
        (one server on its own datastore): this one always does."""
        self.jobs = jobs
        self.membership = membership
        self.settings = settings
        self.name = name
        self.holder = f"{name}/{secrets.token_hex(4)}"  # a restarted server waits for its old lease
        self.lease_ttl = lease_ttl
        self.current: Dispatcher | None = None
        self.term = 0
        self.terms = 0  # how many terms this server has led (for the curious, and the tests)
        self.on_job_done: Callable[[Job, float], None] | None = None
        self._store = shared
        self._task: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self._listener: JobListener | None = None
        self._heard: set[int] = set()  # ids of jobs to read (their notification carried only that)
        self._heard_event = asyncio.Event()
        self._valid_until = 0.0  # monotonic: when our lease may have expired, with a margin

    @property
    def shared(self) -> bool:
        return self._store is not None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.shared:
            await self._lead(1)  # one server on one file: it is the leader
            return
        self._task = asyncio.create_task(self._campaign(), name="leadership")

    async def close(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task])
        was_leading = self.current is not None
        await self._step_down("stopping")
        if was_leading and self._store is not None:
            try:
                await self._store.release_lease(LEASE, self.holder)
            except DpipError as e:
                logger.warning("could not give the lease up: %s", e)

    async def _campaign(self) -> None:
        """Take the lease when it is free; renew it while leading; step down when we cannot."""
        assert self._store is not None
        while True:
            period = self.lease_ttl / (3 if self.current is not None else 6)
            asked = time.monotonic()
            try:
                term = await asyncio.wait_for(
                    self._store.acquire_lease(LEASE, self.holder, self.lease_ttl),
                    timeout=max(0.1, self.lease_ttl - SAFETY_MARGIN - period))
            except (DpipError, asyncio.TimeoutError, OSError) as e:
                term = None
                if self.current is not None:
                    logger.warning("could not renew the scheduler's lease: %s", e or type(e).__name__)
            except Exception:
                term = None
                logger.exception("lease attempt failed")
            if term is not None:
                self._valid_until = asked + self.lease_ttl - SAFETY_MARGIN
                if self.current is None or term != self.term:
                    await self._step_down("a new term")
                    await self._lead(term)
            elif self.current is not None and time.monotonic() >= self._valid_until - period:
                await self._step_down("its lease could not be renewed in time")
            await asyncio.sleep(period)

    async def _lead(self, term: int) -> None:
        self.term = term
        self.terms += 1
        scheduler = Dispatcher(self.jobs, self.membership, self.settings)
        scheduler.on_job_done = self.on_job_done
        self.current = scheduler
        if self._store is not None:
            logger.info("server %s leads (term %d): scheduling", self.name, term)
            self._listener = await self._store.listen_jobs(self._heard_of)
            self._sweeper = asyncio.create_task(self._sweep(scheduler), name="queued-sweep")
        await scheduler.start()

    async def _step_down(self, why: str) -> None:
        scheduler, self.current = self.current, None
        if scheduler is None:
            return
        if self.shared:
            (logger.info if why == "stopping" else logger.warning)("server %s stops scheduling: %s", self.name, why)
        if self._sweeper is not None:
            await stop_tasks([self._sweeper])
            self._sweeper = None
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        await scheduler.close()

    # -- jobs enqueued elsewhere --------------------------------------------------------------

    def _heard_of(self, job_id: int, job: Job | None = None) -> None:
        """A job another server enqueued: scheduled at once if the notification carried it
        (called on the loop), else read by its id on the sweeper's next turn."""
        if job is not None and self.current is not None:
            self.current.submit_announced(job)
            return
        self._heard.add(job_id)
        self._heard_event.set()

    async def _sweep(self, scheduler: Dispatcher) -> None:
        """Submit the jobs other servers enqueued: those we are told of at once, and every
        queued one we do not hold, every few seconds."""
        last_sweep = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._heard_event.wait(), SWEEP_INTERVAL)
            except asyncio.TimeoutError:
                pass
            self._heard_event.clear()
            ids, self._heard = sorted(self._heard), set()
            try:
                if ids:
                    for job in await self.jobs.queued(ids[:1000]):
                        scheduler.submit(job)
                if time.monotonic() - last_sweep >= SWEEP_INTERVAL:
                    last_sweep = time.monotonic()
                    after = -1
                    while True:
                        found = await self.jobs.queued(after=after, limit=1000)
                        for job in found:
                            scheduler.submit(job)  # one already held is not queued twice
                        if len(found) < 1000:
                            break
                        after = found[-1].id
                if self._store is not None and self._listener is not None and self._listener.is_closed():
                    self._listener = await self._store.listen_jobs(self._heard_of)
            except (DpipError, OSError) as e:
                logger.warning("looking for queued jobs failed: %s", e)
                self._heard.update(ids)

    # -- what the API, the metrics and the autoscaler ask -----------------------------------

    @property
    def waiting(self) -> dict[str, str]:
        return self.current.waiting if self.current is not None else {}

    def submit(self, job: Job) -> None:
        """Schedule a job stored as queued, if we lead (else the leader is told of it)."""
        if self.current is not None:
            self.current.submit(job)

    def drop_workload(self, workload_id: str) -> int:
        return self.current.drop_workload(workload_id) if self.current is not None else 0

    def queued(self) -> int:
        return self.current.queued() if self.current is not None else 0

    def queued_for(self, tags: frozenset[str] | None) -> int:
        return self.current.queued_for(tags) if self.current is not None else 0

    def slots(self) -> dict[str, tuple[int, int]]:
        return self.current.slots() if self.current is not None else {}

    async def leader_name(self) -> str | None:
        """The name of the server that schedules now (None if none does, for a moment)."""
        if self.current is not None:
            return self.name
        if self._store is None:
            return None
        holder = await self._store.lease_holder(LEASE)
        return holder.rsplit("/", 1)[0] if holder else None

    def describe(self) -> dict:
        base = self.current.describe() if self.current is not None else {"hedge": self.settings.hedge.value}
        return {**base, "leader": self.current is not None, "server": self.name, "term": self.term}
