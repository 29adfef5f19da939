"""Carrying one attempt of a job to workers: one copy, or two under a tail-latency policy.

Tail latency (Dean and Barroso, "The Tail at Scale"): with ``hedged`` a second copy goes to
another worker once the first has taken longer than the recent p95 for images of that size
(capped at a few times the median, so that a slow worker's outliers cannot push the delay
past themselves), unless jobs are queued (the copy would take a queued job's slot);
with ``tied`` two copies go out at once, each told about the other, and the first to start
cancels the other. The loser is cancelled over RPC; results are idempotent, so a pair that
both finish still stores one image. Slots (which worker may take a copy) stay the
scheduler's business, through the :class:`Slots` it hands in.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from enum import Enum

from common.models import DpipError, InsufficientStorage, Job, Unavailable
from controller.jobs import JobLifecycle, Timing
from filtering.pipeline import label_of
from plane import wire
from plane.rpc import RpcError
from scheduler.latency import LatencyTracker
from scheduler.ports import Members, Slots

logger = logging.getLogger(__name__)

#: How long a timed-out attempt's slot stays taken waiting for its worker to say the work has
#: stopped (a worker waits up to 10 s for its filter thread before it answers).
STOP_WAIT = 12.0


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
    hedge_multiple: float = 4.0  # ... nor later than this times the median: slow outliers that
    # fill the recent window (one worker slow on 1 job in 10) must not push the delay past them
    hedge_floor: float = 0.02  # never hedge sooner than this (seconds)
    hedge_initial: float = 1.0  # hedge delay until enough latencies are known
    probation: float = 1.0  # seconds a worker beaten by a hedge gets work only if others are full
    inline_max_bytes: int = wire.INLINE_MAX_BYTES  # images up to this size travel with their jobs
    tie_delay: float = 0.005  # the second tied copy leaves this much later (so a copy that
    # starts at once can cancel it before it starts: "2x the network delay" in the paper)


@dataclass
class DispatchStats:
    """Counters for the tail-latency policies (shown in /status)."""

    jobs_done: int = 0
    copies_sent: int = 0  # every RunJob sent, first copies included
    copies_started: int = 0  # copies that did work (a cancelled waiting copy did none)
    hedges: int = 0
    sent_ahead: int = 0  # jobs sent to wait on their worker for a slot (its prefetch)


@dataclass
class Outcome:
    """How one copy of a job ended."""

    worker: str
    result: wire.JobResult | None = None
    failure: Failure | None = None
    recorded: bool = False  # the result was stored with its timing already (it came inline)
    answered_at: float = 0.0  # time.monotonic() when the worker answered (or the copy ended)
    stopping: bool = False  # timed out: its slot stays taken until the worker says it stopped
    released: bool = False  # its slot was freed as the worker answered (before the result was stored)


@dataclass(frozen=True)
class Failure:
    """Why an attempt failed, and what that means for the next one."""

    reason: str
    final: bool = False  # no retry can help (e.g. the image cannot be decoded)
    backoff: bool = True  # False when the worker, not the job, was the problem
    transient: bool = False  # the image store or the datastore was out of reach: not counted


def _answer(answered: asyncio.Future[float]) -> None:
    if not answered.done():
        answered.set_result(time.monotonic())


class Carrier:
    """Sends the copies of one attempt, and knows when to hedge and whom to cancel."""

    def __init__(self, jobs: JobLifecycle, membership: Members, settings: SchedulerSettings,
                 latency: LatencyTracker, stats: DispatchStats, slots: Slots) -> None:
        self.jobs = jobs
        self.membership = membership
        self.settings = settings
        self.latency = latency
        self.stats = stats
        self.slots = slots
        self._copies: dict[int, int] = {}  # job id -> copies sent of its attempt being carried

    def forget(self, job_id: int) -> None:
        """The job's attempt is settled: a copy's result that comes after is not its only one."""
        self._copies.pop(job_id, None)

    async def send(self, job: Job, primary: str, ahead: bool = False) -> dict[str, asyncio.Task[Outcome]]:
        """The attempt's copies. A job sent ``ahead`` (to wait on its worker for a slot) goes
        alone: its time there is not a slow worker's, and a second copy would take a slot."""
        policy = HedgePolicy.OFF if ahead else self.settings.hedge
        copies: dict[str, asyncio.Task[Outcome]] = {}
        if policy == HedgePolicy.TIED:
            peer = self.slots.reserve_second(job, primary)
            if peer is not None:
                tie = secrets.token_hex(16)  # lets each copy's worker cancel the other
                copies[primary] = self._start(job, primary, (self._address(peer), tie))
                await asyncio.sleep(self.settings.tie_delay)
                copies[peer] = self._start(job, peer, (self._address(primary), tie))
                await self.jobs.add_copy(job)
                return copies
        answered: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        copies[primary] = self._start(job, primary, answered=answered, ahead=ahead)
        if policy == HedgePolicy.HEDGED:
            # Hedge a worker that has not answered; a result that is being stored needs no copy.
            try:
                await asyncio.wait_for(asyncio.shield(answered), timeout=self.hedge_delay(job))
                return copies
            except TimeoutError:
                pass
            if self.slots.queued() == 0:  # a backlog: a copy would take a queued job's slot
                second = self.slots.reserve_second(job, primary)
                if second is not None:
                    logger.debug("hedging job %d on %s after %.0f ms", job.id, second,
                                 self.hedge_delay(job) * 1000)
                    self.stats.hedges += 1
                    copies[second] = self._start(job, second)
                    await self.jobs.add_copy(job)
        return copies

    def hedge_delay(self, job: Job) -> float:
        """When to send a hedge: the recent p95 latency for this size (but at most a few times
        the median), never below the floor; a fixed delay until enough latencies are known."""
        s = self.settings
        p = self.latency.percentile(job.size, s.hedge_quantile)
        if p is None:
            return max(s.hedge_floor, s.hedge_initial)
        median = self.latency.percentile(job.size, 0.5) or p
        return max(s.hedge_floor, min(p, s.hedge_multiple * median))

    def _address(self, worker: str) -> str:
        info = self.membership.member(worker)
        return info.rpc_address if info is not None else ""

    def _start(self, job: Job, worker: str, tied: tuple[str, str] = ("", ""),
               answered: asyncio.Future[float] | None = None, ahead: bool = False) -> asyncio.Task[Outcome]:
        self.stats.copies_sent += 1
        self._copies[job.id] = self._copies.get(job.id, 0) + 1
        answered = answered or asyncio.get_running_loop().create_future()
        return self.slots.spawn(self._copy(job, worker, tied, answered, ahead))

    async def _copy(self, job: Job, worker: str, tied: tuple[str, str], answered: asyncio.Future[float],
                    ahead: bool = False) -> Outcome:
        """One copy on one worker; its slot is held until the worker has answered (``answered``
        gets the time then, before the result is stored)."""
        outcome: Outcome | None = None
        try:
            outcome = await self._call(job, worker, tied, answered, ahead)
        except Exception as e:
            logger.exception("job %d on %s", job.id, worker)
            outcome = Outcome(worker, failure=Failure(f"internal error: {e!r}"))
        finally:
            if outcome is None or not (outcome.stopping or outcome.released):  # (a stopping copy's
                self.slots.release(worker, job)  # slot is freed by _stop; once, either way)
            _answer(answered)
        outcome.answered_at = answered.result()
        if outcome.result is not None and outcome.result.started:
            self.stats.copies_started += 1
        return outcome

    @staticmethod
    async def first_success(
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

    async def _store_inline(self, job: Job, worker: str, reply: wire.JobResult) -> Failure | None:
        """Store a result that came back inside the reply, judged as an upload would be; why it
        was refused, or None once it is stored (or another copy's result was first). A view of
        its workload read meanwhile waits for it (JobLifecycle.landed)."""
        with self.jobs.landing(job.workload_id):
            return await self._store_inline_now(job, worker, reply)

    async def _store_inline_now(self, job: Job, worker: str, reply: wire.JobResult) -> Failure | None:
        if job.committed is not None and not await asyncio.shield(job.committed):
            return Failure(f"the result of worker {worker} has no job: its upload was not stored")
        try:
            timing = Timing(worker, reply.download_ms, reply.process_ms, reply.upload_ms)
            # The only copy of the job's first attempt: no other result of it can be recorded.
            await self.jobs.store_inline_result(
                job, reply.payload, timing, lambda: job.attempts == 1 and self._copies.get(job.id, 0) == 1)
        except (Unavailable, InsufficientStorage) as e:
            return Failure(f"the result of worker {worker} could not be stored: {e}", transient=True)
        except DpipError as e:
            return Failure(f"worker {worker} sent a result that was refused: {e}")
        return None

    async def _accept_direct(self, job: Job, worker: str, reply: wire.JobResult) -> Failure | None:
        """A result the worker put into the object store: judged there, then recorded."""
        try:
            timing = Timing(worker, reply.download_ms, reply.process_ms, reply.upload_ms)
            problem = await self.jobs.accept_direct_result(job, timing)
        except DpipError as e:
            return Failure(f"the result of worker {worker} could not be checked: {e}", transient=True)
        return Failure(f"worker {worker}: {problem}") if problem else None

    async def _stop(self, worker: str, job: Job) -> None:
        try:
            await self.cancel(worker, job, timeout=STOP_WAIT)
        finally:
            self.slots.release(worker, job)

    async def cancel(self, worker: str, job: Job, timeout: float = 2.0) -> None:
        try:
            await self.membership.call(worker, wire.CancelJob(job.id), timeout=timeout)
        except RpcError as e:
            logger.debug("could not cancel job %d on %s: %s", job.id, worker, e)

    async def _call(self, job: Job, worker: str, tied: tuple[str, str], answered: asyncio.Future[float],
                    ahead: bool = False) -> Outcome:
        """Run the job on ``worker``: success once its result is stored, else what went wrong
        (``ahead``: it waits there for a slot first, within one more timeout)."""
        info = self.membership.member(worker)
        if info is None or info.channel is None:
            return Outcome(worker, failure=Failure(f"worker {worker} went away before the job was sent",
                                                   backoff=False))
        timeout = self.settings.job_timeout * (2 if ahead else 1)
        try:  # an object store: the worker reads and writes it directly, for this job only
            direct = await self.jobs.direct_urls(job, timeout + 5.0, worker)
        except DpipError as e:
            return Outcome(worker, failure=Failure(f"no URLs for the image store: {e}", transient=True))
        inline = min(self.settings.inline_max_bytes, wire.INLINE_MAX_BYTES)
        if direct:  # only small images through this server: the rest between worker and store
            inline = min(inline, wire.DIRECT_INLINE_BYTES)
        if job.committed is not None and not job.committed.done() and not self.jobs.original_in_memory(job):
            # sent as its upload is committed, its bytes no longer in memory: read from its file
            # once that is written (never while it is being written)
            if not await asyncio.shield(job.committed):
                return Outcome(worker, failure=Failure("its upload was not stored", backoff=False))
        original = await self.jobs.inline_original(job, inline) if inline else None  # it travels with the job
        # Over HTTP only what is too large for a frame: then the job carries its capability.
        # (A result larger than the inline limit goes over HTTP too, unless the limit is the most a
        # message carries: then it is too large for any upload.)
        needs_http = not direct and (original is None or inline < wire.INLINE_MAX_BYTES)
        cap = "" if not needs_http else self.membership.capabilities.issue(
            worker, job.id, job.workload_id, job.image_id, label_of(job.filter.value), time.time() + timeout + 5.0)
        msg = wire.RunJob(job.id, job.workload_id, job.image_id, job.filter.value, job.attempts,
                          params=job.params, capability=cap, tied_peer=tied[0], tie=tied[1],
                          payload=original if original is not None else b"",
                          inline_result=inline,
                          original_url=direct[0] if direct else "", result_url=direct[1] if direct else "")
        try:
            reply = await self.membership.call(worker, msg, timeout=timeout)
            self.slots.release(worker, job)  # the worker is done with it: a new job may go there
            _answer(answered)
        except RpcError as e:
            _answer(answered)
            info = self.membership.member(worker)
            if info is None or not info.alive:  # not the job's fault: straight back in line
                return Outcome(worker, failure=Failure(f"worker {worker} died while running the job",
                                                       backoff=False))
            # It may still be working on the job: the job is tried again at once, but this slot
            # stays taken until the worker says the work has stopped (it answers a cancel only then).
            self.slots.spawn(self._stop(worker, job))
            return Outcome(worker, failure=Failure(str(e)), stopping=True)
        outcome = await self._ended(job, worker, reply, bool(direct))
        outcome.released = True  # (above, as the worker answered)
        return outcome

    async def _ended(self, job: Job, worker: str, reply: wire.Message, direct: bool) -> Outcome:
        """How a copy ended: its result stored (it came back with the answer), checked (in the
        object store) or looked for (uploaded over HTTP), or why it failed."""
        if isinstance(reply, wire.JobResult) and reply.job_id == job.id:
            if reply.ok and (len(reply.payload) or direct):
                store = self._store_inline if len(reply.payload) else self._accept_direct
                failure = await store(job, worker, reply)
                return Outcome(worker, result=reply, failure=failure, recorded=failure is None)
            if reply.ok:
                if not await self.jobs.has_result(job):
                    # "done" is what the datastore says, never only what a worker claims
                    return Outcome(worker, result=reply, failure=Failure(
                        f"worker {worker} reported success but stored no result"))
                logger.debug("job %d done on %s: download %.1f ms, process %.1f ms, upload %.1f ms",
                             job.id, worker, reply.download_ms, reply.process_ms, reply.upload_ms)
                return Outcome(worker, result=reply)  # its upload got a 2xx: the result is stored
            return Outcome(worker, result=reply, failure=Failure(
                f"worker {worker}: {reply.error}", final=not reply.retryable, transient=reply.transient))
        return Outcome(worker, failure=Failure(f"worker {worker} gave an unexpected reply: {reply.TYPE}"))
