"""The worker process: heartbeats to the controller, serves job RPCs, filters with Pillow.

It dials the controller's pub/sub port with a Pub0 and publishes a hello (and, once welcomed,
a sealed heartbeat) every interval. It listens on a Rep0 (its RPC address, advertised in the
hello) for the controller's :class:`~plane.wire.Welcome` (session key, API endpoint) and then
the session's sealed messages (:mod:`plane.session`); whom it obeys is :mod:`worker.link`'s
business. An :class:`~plane.wire.Exchange` starts its jobs and stops its cancels at once; each
job's end waits in the session's :class:`~worker.outbox.Outbox` until the session's sender
(:mod:`worker.sessions`) sends it, with every other end ready by then. A job is: its original from the message itself (a frame), or from
the object store's presigned URL, or (too large for a frame) from the API with the job's own
capability; filtered in a thread; its result back as a frame of the Results (or put where it
came from).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pynng

from common.aio import stop_tasks
from common.config import local_address_towards
from common.logs import LogLimiter
from filtering import kernels, pipeline
from filtering.work import Stopped
from plane import declarations, wire
from plane.rpc import RpcServer
from plane.stream import worker_context
from plane.tls import WorkerTls, http_client_context, nng_url
from worker import memory
from worker.filters import FilterError, process, steps_of, warm_up, warm_up_image
from worker.gate import SlotGate
from worker.link import ControllerLink, Refused, WorkerLink
from worker.outbox import Outbox
from worker.sessions import Sessions
from worker.ties import Ties, Untied
from worker.settings import WorkerSettings, join_token_for, prefetch_of
from worker.telemetry import Telemetry
from worker.transfers import JobFailed, Transfers


#: A job whose image is at most this many bytes, and whose pipeline fits INLINE_LIMITS, runs on
#: the worker's loop instead of a filter thread: a 64x64 grayscale takes 0.18 ms there, 0.6-0.85 ms
#: through the thread pool (waking an idle thread, and the loop again after it), measured here.
INLINE_BYTES = 32 * 1024
#: At most this many pixels in any step's image, and pixel-steps in all (64x64 through 4 steps):
#: well under a millisecond of Pillow, so heartbeats and other jobs' I/O never wait on it.
INLINE_LIMITS = pipeline.Limits(max_pixels=128 * 128, max_pixel_steps=4 * 64 * 64)


def _inline(data: bytes, msg: wire.RunJob) -> bool:
    """Whether the job may run on the loop: a small image through built-in filters only (a
    plugin's cost need not follow its pixels)."""
    if len(data) > INLINE_BYTES:
        return False
    try:
        return all(spec.builtin for spec, _ in steps_of(msg.filter, msg.params))
    except FilterError:
        return False  # (said by the filter thread's run)


def _inline_limits(limits: pipeline.Limits) -> pipeline.Limits:
    return pipeline.Limits(min(limits.max_pixels, INLINE_LIMITS.max_pixels),
                           min(limits.max_pixel_steps, INLINE_LIMITS.max_pixel_steps))

logger = logging.getLogger(__name__)


#: How long a cancel waits for a job's work to stop (it stops at its next step, frame or tile:
#: one Pillow call, about a second on the largest image) before it answers anyway.
STOP_WAIT = 10.0
#: A job whose filtering took longer than this (it held large images) gives its memory back to
#: the system when it ends (:mod:`worker.memory`).
TRIM_AFTER_SECONDS = 0.25

#: While no controller has welcomed us, say so after this long, then this often (a worker
#: started before its server must not look dead).
FIRST_WAITING_LOG = 2.0
WAITING_LOG_INTERVAL = 10.0


class Worker:
    """One worker process's state and loops."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.s = settings
        # TLS when told of a CA or given a certificate (plane.tls); TlsError if they are unusable.
        self.tls = WorkerTls(Path(settings.tls_ca) if settings.tls_ca else None,
                             Path(settings.tls_cert) if settings.tls_cert else None,
                             Path(settings.tls_key) if settings.tls_key else None,
                             settings.name) if settings.tls_ca or settings.tls_cert or settings.tls_key else None
        self.telemetry = Telemetry()
        # Array kernels run on the GPU where there is one and CuPy to drive it (else NumPy).
        kernels.use_gpu(self.telemetry.gpu().count > 0 and kernels.array_module(True).__name__ == "cupy")
        self.declared = declarations.of_registry(gpu=kernels.on_gpu())  # built-ins and the plugins loaded
        controllers = settings.controllers or ((settings.controller_host, settings.controller_port),)
        self.links = [ControllerLink(host, port, WorkerLink(settings.name, join_token_for(settings, host, port),
                                                            self.declared),
                                     heartbeat_interval=settings.heartbeat_interval)
                      for host, port in controllers]
        self.link = self.links[0].link  # the first controller's (tests and old callers)
        self.session = self.link.session
        self.executor = ThreadPoolExecutor(settings.capacity, thread_name_prefix="filter")
        self.jobs: dict[int, asyncio.Task[wire.JobResult]] = {}
        self.prefetch = prefetch_of(settings)  # jobs taken beyond capacity, waiting for a slot
        self.gate = SlotGate(settings.capacity)
        self.limits = pipeline.Limits()  # the server's, once it welcomed us (wire.Welcome)
        self.jobs_done = 0
        self.draining = False
        self.refused = 0  # requests refused: forged, replayed, or not from our server
        self._log = LogLimiter(logger)
        self.rpc_address = ""
        self._rpc = RpcServer(self._handle, concurrency=16)  # welcomes and tied peers' cancels
        self._sessions = Sessions(self, self._link_of_key,
                                  worker_context(self.tls) if self.tls is not None else None)
        self._started: set[int] = set()  # jobs whose work has begun (tied cancels spare them)
        self._stopping: set[asyncio.Task] = set()  # the server's cancels, waiting for work to stop
        self._ties = Ties(self.tls)  # tied copies: their secrets, early cancels, peers
        self._transfers: Transfers | None = None  # (its HTTP session is made in the loop, at start)
        self._heartbeat_task: asyncio.Task | None = None

    async def start(self) -> None:
        s = self.s
        await self._warm_up()
        advertise = s.advertise_host or local_address_towards(s.controller_host, s.controller_port)
        tls = self.tls is not None
        bound = self._rpc.listen(nng_url(s.rpc_bind or advertise, s.rpc_port, tls),
                                 self.tls.listener() if self.tls is not None else None)
        port = bound.rsplit(":", 1)[1]
        self.rpc_address = nng_url(advertise, int(port), tls)
        self._rpc.start()
        session_port = await self._sessions.start(s.rpc_bind or advertise, s.session_port)
        for c in self.links:  # told to each server in the (sealed) answer to its welcome
            c.link.joined = dataclasses.replace(c.link.joined, session_port=session_port)
        trust = self.tls.http() if self.tls is not None else http_client_context() if os.environ.get("AWS_CA_BUNDLE") else None
        connector = aiohttp.TCPConnector(ssl=trust) if trust is not None else None
        self._transfers = Transfers(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.http_timeout),
                                                          connector=connector), s.image_store_token)
        for c in self.links:  # a socket each: a controller hears only what is sealed for it
            c.pub = pynng.Pub0(send_timeout=1000)
            c.pub.reconnect_time_min = 100
            c.pub.reconnect_time_max = 1000
            if self.tls is not None:  # the server's certificate must be of our CA and name c.host
                c.pub.tls_config = self.tls.controller(c.host)
            c.pub.dial(nng_url(c.host, c.port, tls), block=False)
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        logger.info("worker %s serving RPC at %s, controller%s %s, capacity %d", s.name, self.rpc_address,
                    "s" if len(self.links) > 1 else "", ", ".join(c.address for c in self.links), s.capacity)

    async def _warm_up(self) -> None:
        """Every filter thread made and the codecs loaded (Pillow imports its plugins on the
        first image) before the server hears of us: a new worker's first jobs take as long as
        any other (measured: 64 workers joining together spent up to 0.3 s each on their first
        job, all at once, on a 2-core machine)."""
        loop = asyncio.get_running_loop()
        sample = warm_up_image()
        await asyncio.gather(*(loop.run_in_executor(self.executor, warm_up, sample, self.s.encode)
                               for _ in range(min(self.s.capacity, 64))))

    async def drain(self) -> None:
        """Stop taking jobs, tell the controller, let running jobs finish (bounded)."""
        self.draining = True
        self.gate.close()  # jobs waiting for a slot end now, to be sent elsewhere
        await self._send_heartbeat()
        running = [t for t in self.jobs.values() if not t.done()]
        if running:
            logger.info("draining: waiting for %d running jobs", len(running))
            await asyncio.wait(running, timeout=self.s.drain_timeout)
        deadline = time.monotonic() + 5.0  # their ends, collected by the server (acknowledged)
        while any(c.outbox.waiting() for c in self.links if c.welcomed) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()  # a heartbeat after the goodbye would revive us
        await self._say_goodbye()

    async def _say_goodbye(self) -> None:
        """Tell the controllers we are gone, so they need not wait for the heartbeat TTL.
        Pub/sub may drop a message: send it twice; the TTL is the fallback."""
        for _ in range(2):
            for c in self.links:
                data = c.link.publish(wire.Goodbye(self.s.name, c.link.session))
                if data is None or c.pub is None:
                    continue  # never welcomed there: nobody to tell
                try:
                    await c.pub.asend(data)
                except pynng.NNGException as e:
                    logger.debug("goodbye not sent: %s", e)
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for c in self.links:
            if c.pub is not None:
                c.pub.close()  # sockets first, then the tasks waiting on them (common.aio)
        self._ties.close()
        await self._rpc.close()
        await self._sessions.close()
        await stop_tasks([t for t in (self._heartbeat_task, *self.jobs.values(), *self._stopping) if t is not None])
        if self._transfers is not None:
            await self._transfers.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- heartbeats -------------------------------------------------------------------------

    def heartbeat(self, session: str = "") -> wire.Heartbeat:
        return wire.Heartbeat(
            name=self.s.name,
            session=session or self.session,
            tags=list(self.s.tags),
            cpu_percent=self.telemetry.cpu_percent(),
            memory_percent=self.telemetry.memory_percent(),
            gpu=self.telemetry.gpu(),
            running_jobs=max(0, self.running() - self.gate.waiting()),
            waiting_jobs=self.gate.waiting(),
            capacity=self.s.capacity,
            prefetch=self.prefetch,
            jobs_done=self.jobs_done,
            draining=self.draining,
            running_job_ids=[jid for jid, t in self.jobs.items() if not t.done()],
        )

    def running(self) -> int:
        return sum(1 for t in self.jobs.values() if not t.done())

    async def _send_heartbeat(self) -> None:
        """To each controller: a hello (so a restarted server welcomes us again), then the
        heartbeat sealed for it."""
        for c in self.links:
            assert c.pub is not None
            for data in (c.link.hello(self.rpc_address), c.link.publish(self.heartbeat(c.link.session))):
                if data is None:
                    continue
                try:
                    await c.pub.asend(data)
                except pynng.NNGException as e:
                    logger.debug("heartbeat to %s not sent: %s", c.address, e)

    def _tls_hint(self, links: list[ControllerLink]) -> str:
        """Why a TLS connection may not be up (nng says nothing of a refused handshake)."""
        down = [c for c in links if c.pub is not None and not c.pub.pipes]
        if self.tls is None or not down:
            return ""
        return (f" No TLS connection to {', '.join(c.host for c in down)}: does the server run with --tls-cert,"
                f" is its certificate for that name and from the CA in {self.tls.ca_file}, and, if it has"
                f" --tls-client-ca, is this worker's certificate ({self.s.tls_cert or 'none given'}) of that CA?")

    async def _heartbeat_loop(self) -> None:
        # Pub/sub drops what is sent before the connection is up: beat fast until welcomed,
        # so joining takes a round trip, not a whole interval.
        waiting_since = time.monotonic()
        last_said = waiting_since - WAITING_LOG_INTERVAL + FIRST_WAITING_LOG  # say it soon, then now and then
        while True:
            await self._send_heartbeat()
            unwelcomed = [c for c in self.links if not c.welcomed]
            now = time.monotonic()
            if len(unwelcomed) == len(self.links) and now - last_said >= WAITING_LOG_INTERVAL:
                last_said = now
                logger.info("still waiting for a welcome from %s (%.0f s): is the server running there?%s%s",
                            ", ".join(c.address for c in unwelcomed), now - waiting_since,
                            "" if all(c.link.join for c in unwelcomed) else
                            " This worker has no join token for it: give it the server's (DPIP_JOIN_TOKEN,"
                            " kept in the server's data dir as join-token)", self._tls_hint(unwelcomed))
            elif len(unwelcomed) < len(self.links):
                waiting_since = last_said = now
            interval = min(c.heartbeat_interval for c in self.links)
            await asyncio.sleep(min(0.1, interval) if unwelcomed else interval)

    # -- RPC --------------------------------------------------------------------------------

    def _link_of_session(self, session: str) -> ControllerLink:
        for c in self.links:
            if c.link.session == session:
                return c
        raise Refused("welcome refused: it is not for this worker's session")

    def _link_of_key(self, kid: str) -> ControllerLink:
        for c in self.links:
            if c.link.channel is not None and c.link.channel.kid == kid:
                return c
        raise Refused("refused: not from a server that welcomed this worker")

    async def _handle(self, msg: wire.Message) -> wire.Message | bytes:
        """Welcomes, sealed requests from our servers, and tied peers' cancels; nothing else."""
        try:
            if isinstance(msg, wire.Welcome):
                c = self._link_of_session(msg.worker_session)
                before = c.link.kid
                reply = c.link.accept_welcome(msg)
                if c.link.kid != before:
                    c.outbox = Outbox()  # a new session: the old one's results are nobody's
                self._welcomed(c, msg)
                return reply
            if isinstance(msg, wire.Sealed):
                c = self._link_of_key(msg.kid)
                inner, fresh, channel = c.link.open(msg)
                if not fresh:
                    raise Refused(f"refused: a replayed {inner.TYPE}")
                raise Refused(f"refused: {inner.TYPE} comes on the session connection, not here")
            if isinstance(msg, wire.CancelJob) and msg.tie and msg.if_not_started:
                return await self._peer_cancel(msg)
            raise Refused(f"refused: a worker takes no unsealed {msg.TYPE}")
        except Refused as e:
            self.refused += 1
            self._log.warning("refused", "%s (%d refused so far)", e, self.refused)
            return wire.Ack(ok=False, error=str(e))

    def exchange(self, msg: wire.Exchange, c: ControllerLink) -> None:
        """Start the batch's jobs and stop its cancels (each one's end goes to ``c``'s outbox),
        and forget the result batches it acknowledges."""
        c.outbox.ack(msg.acks)
        for job in msg.jobs:
            self._start(job, c)
        for job_id in msg.cancels:
            task = asyncio.create_task(self._stop(job_id, c), name=f"stop-{job_id}")
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def _stop(self, job_id: int, c: ControllerLink) -> None:
        """The server's cancel: the job stops (its end, "cancelled", goes out as any other), and
        the server hears once its work has stopped (or that it was not here)."""
        task = self.jobs.get(job_id)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=STOP_WAIT)
        c.outbox.stopped(job_id)

    async def _cancel(self, msg: wire.CancelJob) -> wire.Ack:
        """Stop a job early, and answer once its work has stopped (its slot is then free). A
        tied peer's cancel (``if_not_started``) spares a started copy, so two copies that start
        together both finish rather than both being cancelled."""
        task = self.jobs.get(msg.job_id)
        if task is None:
            return wire.Ack(ok=False, error="no such job")
        if task.done():
            return wire.Ack(ok=False, error="already finished")
        if msg.if_not_started and msg.job_id in self._started:
            return wire.Ack(ok=False, error="already started")
        task.cancel()
        await asyncio.wait([task], timeout=STOP_WAIT)
        return wire.Ack() if task.done() else wire.Ack(ok=False, error="still stopping")

    async def _peer_cancel(self, msg: wire.CancelJob) -> wire.Ack:
        """A tied peer started its copy first and proves it with the attempt's tie secret; a
        cancel that arrives before our copy is kept (bounded) for a copy with that tie."""
        try:
            return await self._cancel(msg) if self._ties.peer_may_cancel(msg) else wire.Ack()
        except Untied as e:
            raise Refused(str(e)) from None

    def _welcomed(self, c: ControllerLink, msg: wire.Welcome) -> None:
        host = f"[{c.host}]" if ":" in c.host else c.host
        scheme = "https" if self.tls is not None else "http"
        c.api_url = (self.s.image_store_endpoint or msg.public_url or f"{scheme}://{host}:{msg.api_port}").rstrip("/")
        if self.tls is not None and not c.api_url.startswith("https://"):
            logger.warning("the API at %s is not HTTPS: tokens and images travel in clear", c.api_url)
        c.heartbeat_interval = min(msg.heartbeat_interval, 5.0)
        if msg.max_pixels:  # the server's limits (an older server sends none: ours stand)
            self.limits = pipeline.Limits.of(msg.max_pixels, msg.max_pixel_steps)
        logger.info("welcomed by the controller at %s (epoch %s); API at %s", c.address, msg.epoch, c.api_url)

    @property
    def api_url(self) -> str:
        """The API of the first controller that welcomed us."""
        return next((c.api_url for c in self.links if c.api_url), "")

    def _start(self, msg: wire.RunJob, c: ControllerLink) -> None:
        """Start a job of an Exchange (a job already running here is not started twice: its one
        end answers both); what cannot start ends at once, saying why."""
        def end(error: str, transient: bool = False) -> None:
            c.outbox.put(wire.JobResult(msg.job_id, ok=False, error=error, worker=self.s.name, transient=transient))

        if self._ties.cancelled_early(msg.job_id, msg.tie):
            return end("cancelled")
        task = self.jobs.get(msg.job_id)
        if task is not None and not task.done():
            return None
        if self.draining:
            return end("worker is shutting down")
        if self.running() >= self.s.capacity + self.prefetch:  # (a cancelled job still stopping holds its slot)
            return end("worker is full", transient=True)
        task = asyncio.create_task(self._execute(msg, c.api_url or self.api_url), name=f"job-{msg.job_id}")
        self.jobs[msg.job_id] = task
        if msg.tie:
            self._ties.tie(msg.job_id, msg.tie)
        task.add_done_callback(lambda t: self._ended(t, msg.job_id, c))

    def _ended(self, task: asyncio.Task[wire.JobResult], job_id: int, c: ControllerLink) -> None:
        """A job's task is over: its end to the outbox, and nothing of it kept here (an answer
        or a traceback would hold its images)."""
        if task.cancelled():
            result = wire.JobResult(job_id, ok=False, error="cancelled", worker=self.s.name,
                                    started=job_id in self._started)
        elif task.exception() is not None:
            logger.error("job %d failed on the worker", job_id, exc_info=task.exception())
            result = wire.JobResult(job_id, ok=False, error="the job failed on the worker", worker=self.s.name)
        else:
            result = task.result()
        if self.jobs.get(job_id) is task:
            del self.jobs[job_id]
        self._ties.forget(job_id)
        self._started.discard(job_id)
        c.outbox.put(result)

    async def _execute(self, msg: wire.RunJob, api_url: str) -> wire.JobResult:
        """The job, once one of the worker's slots is free for it (a job sent ahead waits)."""
        if not await self.gate.enter():
            return wire.JobResult(msg.job_id, ok=False, error="worker is shutting down", worker=self.s.name,
                                  transient=True)
        try:
            return await self._run(msg, api_url)
        finally:
            self.gate.leave()

    async def _run(self, msg: wire.RunJob, api_url: str) -> wire.JobResult:
        if self.s.fail_rate and random.random() < self.s.fail_rate:
            logger.info("fault knob: dropping job %d without a reply", msg.job_id)
            await asyncio.Event().wait()  # until cancelled; the scheduler's timeout must act
        if self.s.slow_rate and random.random() < self.s.slow_rate:
            # A slow machine: the job waits this long for resources before it starts.
            await asyncio.sleep(self.s.slow_ms / 1000)
        self._started.add(msg.job_id)
        if msg.tied_peer:
            asyncio.create_task(self._ties.cancel_peer(msg))
        t0 = time.perf_counter()
        inline: bytes = b""
        try:
            inline_ok = not self.s.image_store_token  # else: through the API, with the operator's token
            if len(msg.payload) and inline_ok:
                data = msg.payload
            elif msg.original_url and inline_ok:
                data = await self._http().fetch(msg.original_url)  # straight from the object store
            else:
                data = await self._http().download(msg, api_url)
            t1 = time.perf_counter()
            try:
                out, fmt = await self._filter(data, msg)
            except FilterError as e:
                raise JobFailed(str(e), retryable=False) from None
            t2 = time.perf_counter()
            if inline_ok and len(out) <= msg.inline_result:
                inline = out  # a frame of the Results: stored by the server as it takes them
            elif msg.result_url and inline_ok:
                await self._http().put(msg.result_url, out, fmt)  # the server judges it there
            elif msg.capability or self.s.image_store_token:
                await self._http().upload(msg, api_url, out, fmt)
            else:
                raise JobFailed(f"the result ({len(out)} bytes) is larger than a message may carry"
                                f" ({msg.inline_result} bytes)", retryable=False)
            t3 = time.perf_counter()
        except JobFailed as e:
            logger.warning("job %d (image %d of %s) failed: %s", msg.job_id, msg.image_id, msg.workload_id, e)
            return wire.JobResult(msg.job_id, ok=False, error=str(e), retryable=e.retryable,
                                  worker=self.s.name, started=True, transient=e.transient)
        self.jobs_done += 1
        return wire.JobResult(
            msg.job_id, ok=True, worker=self.s.name, started=True,
            download_ms=(t1 - t0) * 1000, process_ms=(t2 - t1) * 1000, upload_ms=(t3 - t2) * 1000,
            payload=inline,
        )

    async def _filter(self, data: bytes, msg: wire.RunJob) -> tuple[bytes, str]:
        """The job's pipeline in a filter thread. Cancelled, the work is told to stop and this
        returns (raising CancelledError) only once it has: until then the job holds its slot,
        so the worker never takes more work than it has threads for. A tiny job runs here, on
        the loop, within a budget small enough not to hold it (see INLINE_LIMITS)."""
        if _inline(data, msg):
            try:
                return process(data, msg.filter, msg.params, self.s.encode, _inline_limits(self.limits))
            except FilterError:
                pass  # more than the inline budget (or a real error): in a thread, within the job's limits
        stop = threading.Event()
        work = asyncio.get_running_loop().run_in_executor(
            self.executor, process, data, msg.filter, msg.params, self.s.encode, self.limits, stop)
        started = time.perf_counter()
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()
            while not work.done():
                try:
                    await asyncio.wait([work])
                except asyncio.CancelledError:
                    continue  # cancelled again: the thread is still ours until it stops
            if not work.cancelled():
                work.exception()  # retrieved, so nothing is logged of it
            raise
        except Stopped:
            raise JobFailed("cancelled") from None
        finally:
            if time.perf_counter() - started > TRIM_AFTER_SECONDS:  # it held many pixels: give them back
                self.executor.submit(memory.give_back)

    def _http(self) -> Transfers:
        assert self._transfers is not None, "started"
        return self._transfers
