"""The scheduler: a fair queue of persisted jobs, placed by :func:`placement.place` and carried
to workers over nng req/rep.

A job is a row in the datastore (``queued -> dispatched -> done | failed``). The queue in
memory is rebuilt from those rows at start, so a crash loses nothing. Workloads are served
round-robin, so a huge workload never starves a small one that came after it. A failed attempt
(error reply, timeout, worker death) goes back to the queue with a backoff and a preference
for another worker, until ``max_attempts``; then the job is ``failed`` with the reason.

Tail latency (Dean and Barroso, "The Tail at Scale"): with ``hedged`` a second copy goes to
another worker once the first has taken longer than the recent p95 for images of that size;
with ``tied`` two copies go out at once, each told about the other, and the first to start
cancels the other. The loser is cancelled over RPC; results are idempotent, so a pair that
both finish still stores one image.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import Enum

from common import wire
from common.aio import stop_tasks
from common.rpc import RpcError
from controller.membership import Membership
from controller.models import Job, JobState
from controller.store import Store
from scheduler.latency import LatencyTracker
from scheduler.placement import JobView, WorkerView, place, why_not

logger = logging.getLogger(__name__)


class HedgePolicy(str, Enum):
    OFF = "off"
    HEDGED = "hedged"
    TIED = "tied"


@dataclass(frozen=True)
class SchedulerSettings:
    job_timeout: float = 120.0  # longest one attempt may take, download to upload
    max_attempts: int = 3
    retry_backoff: float = 0.5  # seconds, doubled per attempt
    hedge: HedgePolicy = HedgePolicy.HEDGED
    hedge_quantile: float = 0.95
    hedge_floor: float = 0.05  # never hedge sooner than this (seconds)
    hedge_initial: float = 1.0  # hedge delay until enough latencies are known
    tie_delay: float = 0.005  # the second tied copy leaves this much later (so a copy that
    # starts at once can cancel it before it starts: "2x the network delay" in the paper)


@dataclass
class DispatchStats:
    """Counters for the tail-latency policies (shown in /status)."""

    jobs_done: int = 0
    copies_sent: int = 0  # every RunJob sent, first copies included
    copies_started: int = 0  # copies that did work (a cancelled waiting copy did none)
    hedges: int = 0


@dataclass
class Outcome:
    """How one copy of a job ended."""

    worker: str
    result: wire.JobResult | None = None
    failure: Failure | None = None


@dataclass(frozen=True)
class Failure:
    """Why an attempt failed, and what that means for the next one."""

    reason: str
    final: bool = False  # no retry can help (e.g. the image cannot be decoded)
    backoff: bool = True  # False when the worker, not the job, was the problem


class Scheduler:
    """Owns the queue and the jobs in flight; wakes up on new jobs and on worker news."""

    def __init__(self, store: Store, membership: Membership, settings: SchedulerSettings) -> None:
        self.store = store
        self.membership = membership
        self.settings = settings
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()  # workload -> jobs, FIFO
        self._in_flight: dict[str, dict[int, Job]] = {}  # worker -> job id -> job
        self._finished: dict[int, float] = {}  # job id -> when its call ended (recently)
        self.waiting: dict[str, str] = {}  # workload id -> why its next job is not placed
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._turn = 0
        self.latency = LatencyTracker()
        self.stats = DispatchStats()
        membership.subscribe(on_change=self.wake, on_lost=lambda name: self.wake())

    # -- public -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Requeue what the datastore says is unfinished, then start placing."""
        jobs = await self.store.unfinished_jobs()
        for job in jobs:
            self._enqueue(job)
        if jobs:
            logger.info("resumed %d unfinished jobs", len(jobs))
        self._loop_task = asyncio.create_task(self._run(), name="scheduler")

    async def close(self) -> None:
        await stop_tasks([t for t in (self._loop_task, *self._tasks) if t is not None])

    def submit(self, job: Job) -> None:
        """Queue a job that the datastore already holds as ``queued``."""
        self._enqueue(job)
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def describe(self) -> dict:
        """Policy and counters, for /status."""
        st = self.stats
        return {
            "hedge": self.settings.hedge.value,
            "jobs_done": st.jobs_done,
            "copies_sent": st.copies_sent,
            "copies_started": st.copies_started,
            "hedges": st.hedges,
        }

    # -- placing ----------------------------------------------------------------------------

    def _enqueue(self, job: Job) -> None:
        self._queues.setdefault(job.workload_id, deque()).append(job)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._place_what_fits()

    def _views(self) -> list[WorkerView]:
        now = time.monotonic()
        for jid, t in list(self._finished.items()):
            if now - t > 5.0:  # older than any heartbeat that could still report it running
                del self._finished[jid]
        views = []
        for w in self.membership.snapshot():
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
                capacity=w.capacity,
                ready=w.alive and w.welcomed and not w.draining and w.capacity > 0,
            ))
        return views

    def _place_what_fits(self) -> None:
        """Round-robin over workloads: each turn places the head job of the next workload."""
        workers = self._views()
        if workers:  # rotate, so ties between equal workers go round
            self._turn = (self._turn + 1) % len(workers)
            workers = workers[self._turn:] + workers[:self._turn]
        views = {v.name: v for v in workers}
        now = time.monotonic()
        next_retry: float | None = None
        blocked: set[str] = set()
        while True:
            progressed = False
            for wid in list(self._queues):
                if wid in blocked:
                    continue
                queue = self._queues[wid]
                job = queue[0]
                if job.not_before > now:
                    next_retry = min(next_retry or job.not_before, job.not_before)
                    blocked.add(wid)
                    continue
                jv = JobView(frozenset(job.tags), frozenset(job.avoid))
                name = place(jv, views.values())
                if name is None:
                    self.waiting[wid] = why_not(jv, views.values())
                    blocked.add(wid)
                    continue
                self.waiting.pop(wid, None)
                queue.popleft()
                if not queue:
                    del self._queues[wid]
                else:
                    self._queues.move_to_end(wid)  # fairness: this workload goes to the back
                self._in_flight.setdefault(name, {})[job.id] = job
                v = views[name]
                views[name] = WorkerView(**{**v.__dict__, "in_flight": v.in_flight + 1})
                task = asyncio.create_task(self._dispatch(job, name), name=f"job-{job.id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                progressed = True
                break  # restart the round from the (rotated) front
            if not progressed:
                break
        if next_retry is not None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, next_retry - time.monotonic()), self.wake
            )

    # -- carrying ---------------------------------------------------------------------------

    async def _dispatch(self, job: Job, primary: str) -> None:
        """One attempt of a job: its copies (one, or two with a tail policy), then the outcome."""
        try:
            if not await self.store.mark_dispatched(job, primary, self.settings.job_timeout):
                self._release(primary, job)
                return  # finished or failed meanwhile
            job.attempts += 1
            job.state = JobState.DISPATCHED
            t0 = time.monotonic()
            copies = await self._send_copies(job, primary)
            outcome, failure = await self._first_success(copies)
            for name, task in copies.items():
                if (outcome is None or name != outcome.worker) and not task.done():
                    self._spawn(self._cancel(name, job))  # its slot frees when it answers
            if outcome is not None and outcome.result is not None:
                self.latency.record(job.size, time.monotonic() - t0)
                self.stats.jobs_done += 1
                r = outcome.result
                await self.store.record_result(job, outcome.worker, r.download_ms, r.process_ms, r.upload_ms)
            else:
                await self._attempt_failed(job, primary, failure or Failure("no copy succeeded"))
        except Exception:  # a bug here must cost one attempt, never the job
            logger.exception("dispatching job %d failed", job.id)
            await self._attempt_failed(job, primary, Failure("internal error while dispatching"))
        finally:
            self.wake()

    async def _send_copies(self, job: Job, primary: str) -> dict[str, asyncio.Task[Outcome]]:
        policy = self.settings.hedge
        copies: dict[str, asyncio.Task[Outcome]] = {}
        if policy == HedgePolicy.TIED:
            peer = self._reserve_second(job, primary)
            if peer is not None:
                copies[primary] = self._start_copy(job, primary, tied_peer=self._address(peer))
                await asyncio.sleep(self.settings.tie_delay)
                copies[peer] = self._start_copy(job, peer, tied_peer=self._address(primary))
                await self.store.add_copy(job)
                return copies
        copies[primary] = self._start_copy(job, primary)
        if policy == HedgePolicy.HEDGED:
            done, _ = await asyncio.wait(copies.values(), timeout=self.hedge_delay(job))
            if not done:
                second = self._reserve_second(job, primary)
                if second is not None:
                    logger.debug("hedging job %d on %s after %.0f ms", job.id, second,
                                 self.hedge_delay(job) * 1000)
                    self.stats.hedges += 1
                    copies[second] = self._start_copy(job, second)
                    await self.store.add_copy(job)
        return copies

    def hedge_delay(self, job: Job) -> float:
        """When to send a hedge: the recent p95 latency for this size, never below the floor."""
        p = self.latency.percentile(job.size, self.settings.hedge_quantile)
        return max(self.settings.hedge_floor, p if p is not None else self.settings.hedge_initial)

    def _reserve_second(self, job: Job, primary: str) -> str | None:
        """Another worker with a free slot for a second copy (never beyond capacity), reserved."""
        views = [v for v in self._views() if v.name != primary]
        name = place(JobView(frozenset(job.tags), frozenset(job.avoid)), views)
        if name is not None:
            self._in_flight.setdefault(name, {})[job.id] = job
        return name

    def _address(self, worker: str) -> str:
        info = self.membership.workers.get(worker)
        return info.rpc_address if info is not None else ""

    def _start_copy(self, job: Job, worker: str, tied_peer: str = "") -> asyncio.Task[Outcome]:
        self.stats.copies_sent += 1
        return self._spawn(self._copy(job, worker, tied_peer))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _release(self, worker: str, job: Job) -> None:
        self._in_flight.get(worker, {}).pop(job.id, None)
        self._finished[job.id] = time.monotonic()
        self.wake()

    async def _copy(self, job: Job, worker: str, tied_peer: str) -> Outcome:
        """One copy on one worker; its slot is held until the worker has answered."""
        try:
            outcome = await self._call(job, worker, tied_peer)
        except Exception as e:
            logger.exception("job %d on %s", job.id, worker)
            outcome = Outcome(worker, failure=Failure(f"internal error: {e!r}"))
        finally:
            self._release(worker, job)
        if outcome.result is not None and outcome.result.started:
            self.stats.copies_started += 1
        return outcome

    @staticmethod
    async def _first_success(
        copies: dict[str, asyncio.Task[Outcome]],
    ) -> tuple[Outcome | None, Failure | None]:
        """The first copy to succeed; else (None, the first copy's failure) once all failed."""
        pending = set(copies.values())
        failures: dict[str, Failure] = {}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                outcome = task.result()
                if outcome.failure is None:
                    return outcome, None
                failures[outcome.worker] = outcome.failure
        first = next(iter(copies))
        return None, failures.get(first) or next(iter(failures.values()))

    async def _cancel(self, worker: str, job: Job) -> None:
        client = self.membership.client(worker)
        if client is None:
            return
        try:
            await client.call(wire.CancelJob(job.id), timeout=2.0)
        except RpcError as e:
            logger.debug("could not cancel job %d on %s: %s", job.id, worker, e)

    async def _call(self, job: Job, worker: str, tied_peer: str = "") -> Outcome:
        """Run the job on ``worker``: success once its result is stored, else what went wrong."""
        client = self.membership.client(worker)
        if client is None:
            return Outcome(worker, failure=Failure(f"worker {worker} went away before the job was sent",
                                                   backoff=False))
        msg = wire.RunJob(job.id, job.workload_id, job.image_id, job.filter.value, job.attempts,
                          tied_peer=tied_peer)
        try:
            reply = await client.call(msg, timeout=self.settings.job_timeout)
        except RpcError as e:
            info = self.membership.workers.get(worker)
            if info is not None and not info.alive:  # not the job's fault: straight back in line
                return Outcome(worker, failure=Failure(f"worker {worker} died while running the job",
                                                       backoff=False))
            self._spawn(self._cancel(worker, job))  # it may still hold the job: free the slot
            return Outcome(worker, failure=Failure(str(e)))
        if isinstance(reply, wire.JobResult) and reply.job_id == job.id:
            if reply.ok:
                logger.debug("job %d done on %s: download %.1f ms, process %.1f ms, upload %.1f ms",
                             job.id, worker, reply.download_ms, reply.process_ms, reply.upload_ms)
                return Outcome(worker, result=reply)  # its upload got a 2xx: the result is stored
            return Outcome(worker, result=reply,
                           failure=Failure(f"worker {worker}: {reply.error}", final=not reply.retryable))
        return Outcome(worker, failure=Failure(f"worker {worker} gave an unexpected reply: {reply}"))

    async def _attempt_failed(self, job: Job, worker: str, failure: Failure) -> None:
        if failure.final or job.attempts >= self.settings.max_attempts:
            logger.error("job %d (workload %s, image %d) failed for good after %d attempt(s): %s",
                         job.id, job.workload_id, job.image_id, job.attempts, failure.reason)
            await self.store.fail_job(job, failure.reason)
            return
        if not await self.store.requeue(job, failure.reason):
            return  # its result arrived meanwhile (e.g. the upload beat a lost reply)
        logger.warning("job %d attempt %d on %s failed, retrying: %s",
                       job.id, job.attempts, worker, failure.reason)
        job.state = JobState.QUEUED
        job.avoid.add(worker)
        delay = self.settings.retry_backoff * 2 ** (job.attempts - 1) if failure.backoff else 0.0
        job.not_before = time.monotonic() + delay
        self._enqueue(job)
