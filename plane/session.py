"""The server's end of one worker's session: jobs out in batches, results back in batches.

One long-lived connection per welcomed worker (:mod:`plane.stream`: the server dials the port
the worker named in its sealed ``joined``, on the host of the address it was welcomed at; TLS
with the plane's certificates) carries everything of its jobs, where there used to be an RPC
per job:

- :meth:`Session.run` queues a job and :meth:`Session.stop` a cancel; everything queued in one
  turn of the event loop leaves in one sealed :class:`~plane.wire.Exchange` (originals as raw
  frames, up to :data:`~plane.wire.BATCH_BYTES` a message), with the acknowledgements of the
  result batches received meanwhile (acknowledgements alone wait :data:`ACK_DELAY` for jobs
  to go with). No timer: a batch is whatever piled up (Dask's
  ``BatchedSend`` without its interval).
- The worker sends :class:`~plane.wire.Results` as jobs end, with every end ready by then (the
  results' bytes as frames); the session resolves each job's future. A batch is kept by the
  worker until acknowledged and sent again on the next connection if its own was lost.
- :meth:`Session.stop` asks for a job to be stopped and waits until the worker says its work has
  stopped (or was not there): until then the job's slot stays taken.

One seal per message, not per job. A lost connection fails the jobs waiting on it (the scheduler
asks for their stop once it is back, and tries them again meanwhile); a dead worker fails them
all for good.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

from common.aio import stop_tasks
from plane import wire
from plane.rpc import RpcError
from plane.seal import Channel, SealError
from plane.stream import FrameConnection, StreamClosed, write_frame

logger = logging.getLogger(__name__)

#: How long a connection to a worker's session port may take (TLS handshake included).
CONNECT_TIMEOUT = 3.0
#: Wait between two attempts to connect.
RECONNECT = 0.2
#: Acknowledgements wait this long for an Exchange that carries jobs (they go with it), before
#: they go alone: a send each way fewer per batch of results while jobs flow (measured: 0.4
#: of an Exchange per job was only acks), and a worker holds its sent batches a moment longer.
ACK_DELAY = 0.2


@dataclass
class PlaneStats:
    """Messages and what they carried, over every session of this server (for /status)."""

    exchanges: int = 0  # Exchange messages sent
    with_jobs: int = 0  # those that carried jobs
    jobs: int = 0  # jobs they carried
    batches: int = 0  # Results received
    results: int = 0  # job ends they carried
    connections: int = 0  # session connections made

    def as_json(self) -> dict:
        return {"exchanges": self.exchanges, "jobs_sent": self.jobs,
                "jobs_per_message": round(self.jobs / self.with_jobs, 2) if self.with_jobs else 0.0,
                "result_batches": self.batches, "results_received": self.results,
                "results_per_batch": round(self.results / self.batches, 2) if self.batches else 0.0,
                "connections": self.connections}


class Session:
    """The server's end of one welcomed worker's session (see the module's docstring)."""

    def __init__(self, name: str, host: str, port: int, channel: Channel, tls: ssl.SSLContext | None = None,
                 stats: PlaneStats | None = None) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.channel = channel
        self.tls = tls
        self.stats = stats if stats is not None else PlaneStats()
        self._jobs: list[wire.RunJob] = []  # queued for the next Exchange
        self._cancels: list[int] = []
        self._acks: list[int] = []  # batches received, to acknowledge in the next Exchange
        self._results: dict[int, asyncio.Future[wire.JobResult]] = {}  # job id -> its end, awaited
        self._stops: dict[int, asyncio.Future[None]] = {}  # job id -> its work stopped
        self._sent: set[int] = set()  # jobs sent on the current connection
        self._writer: FrameConnection | None = None
        self._task: asyncio.Task | None = None
        self._flushing = False
        self._ack_timer: asyncio.TimerHandle | None = None
        self._closed = ""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"session-{self.name}")

    async def close(self, why: str) -> None:
        """The worker is gone: every job waiting on it fails with ``why``."""
        self._closed = why
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        self._fail_all(why)
        if self._writer is not None:
            self._writer.close()
        await stop_tasks([t for t in (self._task,) if t is not None])

    def _fail_all(self, why: str) -> None:
        for future in (*self._results.values(), *self._stops.values()):
            if not future.done():
                future.set_exception(RpcError(f"worker {self.name}: {why}"))
                future.exception()  # (retrieved: nobody may be waiting any more)
        self._results.clear()
        self._stops.clear()

    # -- jobs out ---------------------------------------------------------------------------

    async def run(self, job: wire.RunJob, timeout: float) -> wire.JobResult:
        """Send ``job`` (in the next batch) and return how it ended; RpcError if that is not
        known within ``timeout``, or the connection is lost (the job may still be running: see
        :meth:`stop`)."""
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

    def _flush(self, hello: bool = False) -> None:
        """Everything queued, in as few Exchanges as its budget allows (``hello``: at least one,
        to say who we are on a new connection)."""
        self._flushing = False
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._closed:
            return
        if self._writer is None:
            return  # not connected (yet, or again): all goes with the first message of the next
            # connection (a job waits at most its timeout; a dead worker fails it at once)
        while self._jobs or self._cancels or self._acks or hello:
            hello = False
            jobs, self._jobs = wire.first_batch(self._jobs)
            cancels, self._cancels = self._cancels[:wire.MAX_BATCH], self._cancels[wire.MAX_BATCH:]
            acks, self._acks = self._acks[:wire.MAX_BATCH], self._acks[wire.MAX_BATCH:]
            parts, _ = self.channel.seal(wire.Exchange(jobs, cancels, acks))
            write_frame(self._writer, parts)
            self._sent.update(job.job_id for job in jobs)
            self.stats.exchanges += 1
            self.stats.with_jobs += bool(jobs)
            self.stats.jobs += len(jobs)

    def _fail(self, job_id: int, why: str) -> None:
        future = self._results.get(job_id)
        if future is not None and not future.done():
            future.set_exception(RpcError(f"worker {self.name}: {why}"))

    # -- the connection, and results back ----------------------------------------------------

    async def _run(self) -> None:
        while not self._closed:
            try:
                _, writer = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                    lambda: FrameConnection(wire.MAX_SESSION_BYTES), self.host, self.port, ssl=self.tls,
                    server_hostname=self.name if self.tls else None), CONNECT_TIMEOUT)
            except (OSError, TimeoutError, ssl.SSLError) as e:
                logger.debug("session with %s: cannot connect to %s:%d: %s", self.name, self.host, self.port, e)
                await asyncio.sleep(RECONNECT)
                continue
            self.stats.connections += 1
            self._writer = writer
            try:
                self._flush(hello=True)  # the first message says who we are
                await self._receive(writer)
            except (StreamClosed, wire.DecodeError) as e:
                if not self._closed:
                    logger.info("session with %s lost (%s): connecting again", self.name, e)
            finally:
                self._writer = None
                writer.close()
                lost, self._sent = self._sent, set()
                for job_id in lost:  # their ends may have been on their way: ask again (stop)
                    self._fail(job_id, "the session connection was lost")
            await asyncio.sleep(RECONNECT)

    async def _receive(self, connection: FrameConnection) -> None:
        while True:
            data = await connection.read()
            sealed = wire.decode(data, wire.MAX_SESSION_BYTES)
            if not isinstance(sealed, wire.Sealed):
                raise wire.DecodeError(f"an unsealed {sealed.TYPE} on the session")
            try:
                reply, fresh = self.channel.open(sealed)
            except SealError as e:
                raise wire.DecodeError(f"a bad seal on the session: {e}") from None
            if not fresh or not isinstance(reply, wire.Results):
                raise wire.DecodeError(f"a replayed or unexpected {reply.TYPE} on the session")
            self._take(reply)

    def _take(self, reply: wire.Results) -> None:
        if reply.batch:
            self._acks.append(reply.batch)
            self.stats.batches += 1
            self.stats.results += len(reply.results)
            # Acknowledged with the jobs placed as these ends free slots, else alone a moment later.
            if len(self._acks) >= wire.MAX_BATCH:
                self._kick()
            elif self._ack_timer is None and not self._flushing:
                self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._kick)
        for result in reply.results:
            self._sent.discard(result.job_id)
            future = self._results.pop(result.job_id, None)
            if future is not None and not future.done():
                future.set_result(result)
        for job_id in reply.stopped:
            future = self._stops.get(job_id)
            if future is not None and not future.done():
                future.set_result(None)
