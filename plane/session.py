"""The server's end of one worker's session: jobs out in batches, results back in batches.

One long-lived channel per welcomed worker (its RPC client and session key) carries everything
of its jobs, where there used to be a call per job. Its one request is the
:class:`~plane.wire.Exchange`:

- :meth:`Session.run` queues a job and :meth:`Session.stop` a cancel; everything queued in one
  turn of the event loop leaves in one sealed Exchange (originals as raw frames, up to
  :data:`~plane.wire.BATCH_BYTES` a message). No timer: a batch is whatever piled up meanwhile
  (Dask's ``BatchedSend`` without its interval).
- The worker answers an Exchange as soon as any job has ended, with every end ready by then
  (:class:`~plane.wire.Results`, the results' bytes as frames), or empty after ``hold``
  seconds. The oldest Exchange waiting at the worker takes the next results, and the session
  always keeps one waiting: a job's end comes back in the reply to the request that may have
  brought the next job, two messages per job at most.
- Each Exchange acknowledges the batches received since the last one; the worker keeps a batch
  until then and sends it again if no acknowledgement comes within :data:`RESEND_AFTER` (a
  reply lost with its connection loses no result).

One MAC per message, not per job. A worker that dies fails every future of its session at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from common.aio import stop_tasks
from plane import wire
from plane.rpc import RpcClient, RpcError
from plane.seal import Channel

logger = logging.getLogger(__name__)

#: How long the worker holds an Exchange with nothing to report before answering it empty.
HOLD = 5.0
#: How much longer than its hold an Exchange may take before the server gives up on it.
SLACK = 5.0
#: A batch not acknowledged this long after it was sent is sent again (by the worker).
RESEND_AFTER = HOLD + SLACK


@dataclass
class PlaneStats:
    """Messages and what they carried, over every session of this server (for /status)."""

    exchanges: int = 0  # Exchange messages sent
    jobs: int = 0  # jobs they carried
    batches: int = 0  # Results that carried something
    results: int = 0  # job ends they carried

    def as_json(self) -> dict:
        return {"exchanges": self.exchanges, "jobs_sent": self.jobs,
                "jobs_per_exchange": round(self.jobs / self.exchanges, 2) if self.exchanges else 0.0,
                "result_batches": self.batches, "results_received": self.results,
                "results_per_batch": round(self.results / self.batches, 2) if self.batches else 0.0}


class Session:
    """The server's end of one welcomed worker's session (see the module's docstring)."""

    def __init__(self, name: str, client: RpcClient, channel: Channel, hold: float = HOLD,
                 stats: PlaneStats | None = None) -> None:
        self.name = name
        self.client = client
        self.channel = channel
        self.hold = hold
        self.stats = stats if stats is not None else PlaneStats()
        self._jobs: list[wire.RunJob] = []  # queued for the next Exchange
        self._cancels: list[int] = []
        self._acks: list[int] = []  # batches received, to acknowledge in the next Exchange
        self._results: dict[int, asyncio.Future[wire.JobResult]] = {}  # job id -> its end, awaited
        self._stops: dict[int, asyncio.Future[None]] = {}  # job id -> its work stopped
        self._tasks: set[asyncio.Task] = set()  # exchanges in flight
        self._flushing = False
        self._closed = ""

    def start(self) -> None:
        self._send()  # the first one waiting at the worker

    async def close(self, why: str) -> None:
        """The worker is gone: every job waiting on it fails with ``why``."""
        self._closed = why
        for future in (*self._results.values(), *self._stops.values()):
            if not future.done():
                future.set_exception(RpcError(f"worker {self.name}: {why}"))
                future.exception()  # (retrieved: nobody may be waiting any more)
        self._results.clear()
        self._stops.clear()
        await stop_tasks(list(self._tasks))

    # -- jobs out ---------------------------------------------------------------------------

    async def run(self, job: wire.RunJob, timeout: float) -> wire.JobResult:
        """Send ``job`` (in the next batch) and return how it ended; RpcError if that is not
        known within ``timeout`` (the job may still be running: see :meth:`stop`)."""
        if self._closed:
            raise RpcError(f"worker {self.name}: {self._closed}")
        future = self._results.get(job.job_id)
        if future is None or future.done():
            future = self._results[job.job_id] = asyncio.get_running_loop().create_future()
        self._jobs.append(job)
        self._kick()
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise RpcError(f"job {job.job_id} on {self.name}: no reply within {timeout:.1f}s") from None

    async def stop(self, job_id: int, timeout: float) -> None:
        """Ask the worker to stop ``job_id`` and wait until its work has stopped (or was not
        there); RpcError if the worker does not say so within ``timeout``."""
        if self._closed:
            raise RpcError(f"worker {self.name}: {self._closed}")
        future = self._stops.get(job_id)
        if future is None:
            future = self._stops[job_id] = asyncio.get_running_loop().create_future()
            self._cancels.append(job_id)
            self._kick()
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise RpcError(f"cancel of job {job_id} on {self.name}: no reply within {timeout:.1f}s") from None
        finally:
            if self._stops.get(job_id) is future:
                del self._stops[job_id]
            result = self._results.get(job_id)
            if result is not None and not result.done():
                result.cancel()  # nobody waits for it any more
                del self._results[job_id]

    def _kick(self) -> None:
        """Send what is queued at the end of this turn of the loop (with whatever else is
        queued by then)."""
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        while (self._jobs or self._cancels) and not self._closed:
            jobs, size = [], 0
            while self._jobs and len(jobs) < wire.MAX_BATCH and (
                    not jobs or size + len(self._jobs[0].payload) <= wire.BATCH_BYTES):
                job = self._jobs.pop(0)
                jobs.append(job)
                size += len(job.payload)
            cancels, self._cancels = self._cancels[:wire.MAX_BATCH], self._cancels[wire.MAX_BATCH:]
            self._send(jobs, cancels)

    def _send(self, jobs: list[wire.RunJob] | None = None, cancels: list[int] | None = None) -> None:
        if self._closed:
            return
        acks, self._acks = self._acks[:wire.MAX_BATCH], self._acks[wire.MAX_BATCH:]
        task = asyncio.create_task(self._exchange(jobs or [], cancels or [], acks), name=f"exchange-{self.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _exchange(self, jobs: list[wire.RunJob], cancels: list[int], acks: list[int]) -> None:
        msg = wire.Exchange(jobs, cancels, acks, self.hold)
        self.stats.exchanges += 1
        self.stats.jobs += len(jobs)
        failed = False
        try:
            reply = await self.client.call(msg, timeout=self.hold + SLACK, channel=self.channel)
            if not isinstance(reply, wire.Results):
                raise RpcError(f"exchange refused: {getattr(reply, 'error', reply.TYPE)}")
        except RpcError as e:
            failed = True
            # The worker may or may not have had them: each waiter hears it, and the scheduler
            # asks for a stop (which the worker answers for a job it never had).
            self._acks[:0] = acks  # (perhaps never seen: said again)
            for job in jobs:
                future = self._results.get(job.job_id)
                if future is not None and not future.done():
                    future.set_exception(RpcError(str(e)))
            for job_id in cancels:
                future = self._stops.get(job_id)
                if future is not None and not future.done():
                    future.set_exception(RpcError(str(e)))
            if not self._closed:
                logger.debug("exchange with %s failed: %s", self.name, e)
        else:
            self._take(reply)
        finally:
            if not self._closed and not any(t is not asyncio.current_task() for t in self._tasks):
                # None left waiting at the worker: one more, for the ends of the jobs it runs.
                if failed:
                    await asyncio.sleep(0.05)  # (a connection being re-made: not a busy loop)
                self._send()

    def _take(self, reply: wire.Results) -> None:
        if reply.batch:
            self._acks.append(reply.batch)
            self.stats.batches += 1
            self.stats.results += len(reply.results)
        for result in reply.results:
            future = self._results.pop(result.job_id, None)
            if future is not None and not future.done():
                future.set_result(result)
        for job_id in reply.stopped:
            future = self._stops.get(job_id)
            if future is not None and not future.done():
                future.set_result(None)
