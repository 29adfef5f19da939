"""Worker membership over nng pub/sub: join, heartbeat, expire after a TTL, forget.

Workers dial the controller's Sub0 socket with a Pub0. A :class:`~plane.wire.Hello`, sealed
with the join key (every controller has a join token: given, or generated and left for this
machine's workers, :mod:`plane.localjoin`), makes the controller call the RPC address it names,
on the host the hello came from, with a :class:`~plane.wire.Welcome` from which both derive a
session key (never sent); the worker is a member once it acknowledges with that key. From then
on only sealed, fresh heartbeats count: they keep it alive; a worker silent for ``ttl`` seconds
is dead (its session key and job capabilities die with it), listeners requeue its jobs, and it
is forgotten ``forget_after`` seconds later. The scheduler calls workers through
:meth:`Membership.call`, which seals.

A member's claimed capacity is trusted only as far as it has proven it (:meth:`WorkerInfo.slots`):
a newcomer gets a few slots, twice as many each time half of them came back with stored results.

Everything here is bounded against a hostile network: at most ``max_workers`` members and
``MAX_PENDING`` joins in progress, one welcome attempt per name at a time and per second,
``MAX_WELCOMING`` welcomes at once and ``WELCOME_RATE`` a second in all, and refusals are
counted and logged at a bounded rate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import pynng

from common.aio import stop_tasks
from common.logs import LogLimiter
from common.models import Limits
from controller.capability import Capabilities
from controller.catalog import Catalog
from controller.workers import WorkerInfo, WorkerState
from filtering.model import FilterSpec
from plane import wire
from plane.declarations import read_all
from plane.addresses import host_of, same_host, source_host
from plane.rpc import RpcClient, RpcError
from plane.session import PlaneStats, Session
from plane.seal import (
    C2W,
    JOIN,
    W2C,
    Channel,
    SealError,
    WelcomeReply,
    join_key,
    open_with,
    session_key,
    welcome_proof,
)
from plane.stream import server_context
from plane.tls import ServerTls, is_tls
from storage.datastore import Datastore

logger = logging.getLogger(__name__)

MAX_PENDING = 256  # joins being welcomed or recently tried
WELCOME_RETRY = 1.0  # seconds between two welcome attempts for one name
MAX_WELCOMING = 32  # welcomes in flight at once, whatever the names
WELCOME_RATE = 20.0  # welcome attempts per second in all (a burst of as many)
WELCOME_TIMEOUT = 3.0  # seconds a welcome waits for the worker's acknowledgement
RECEIVE_BATCH = 256  # messages handed to the loop in one call at most


@dataclass
class _Join:
    """A hello being answered: when we last tried, whether a welcome is in flight."""

    tried: float = 0.0
    busy: bool = False


class Membership:
    """The controller's view of the workers, kept fresh by sealed heartbeats."""

    def __init__(
        self,
        store: Datastore,
        secret: bytes,
        api_port: int,
        public_url: str,
        heartbeat_interval: float = 1.0,
        ttl: float = 3.0,
        join_token: str = "",
        forget_after: float = 600.0,
        max_workers: int = 1000,
        tls: ServerTls | None = None,
        limits: Limits = Limits(),
    ) -> None:
        self.store = store
        self.limits = limits  # what one job may make and spend: told to every worker it welcomes
        self.tls = tls  # the worker plane over TLS (client certificates if tls.mutual)
        self.api_port = api_port
        self.public_url = public_url
        self.heartbeat_interval = heartbeat_interval
        self.ttl = ttl
        self.forget_after = forget_after
        self.max_workers = max_workers
        if not join_token:
            raise ValueError("the controller needs a join token (see controller.auth.system_join_token)")
        self.join = join_key(join_token)  # hellos and welcomes prove they know it
        self.epoch = secrets.token_hex(6)  # changes each start: workers get re-welcomed
        self.workers: dict[str, WorkerInfo] = {}
        self.catalog = Catalog(self.workers)  # the fleet's filters, from these workers' declarations
        self.sessions: dict[str, Session] = {}  # each welcomed worker's: its jobs and results
        self.plane = PlaneStats()  # what the sessions carried
        self._session_tls = server_context(tls) if tls is not None else None
        self._closing: set[asyncio.Task] = set()  # sessions of lost workers being closed
        self.refused = 0  # hellos, heartbeats and goodbyes that failed authentication
        self.vanished = 0  # hellos read after their connection had closed (dropped quietly)
        self.bad_messages = 0
        self.welcomes_failed = 0  # hellos answered with a welcome that never got through
        self.capabilities = Capabilities(secret, self.epoch, self.workers)  # the jobs' HTTP credentials
        self._by_kid: dict[str, WorkerInfo] = {}
        self._joins: OrderedDict[str, _Join] = OrderedDict()
        self._left: OrderedDict[str, None] = OrderedDict()  # key ids of workers that said goodbye
        self._log = LogLimiter(logger)
        self._sock: pynng.Sub0 | None = None
        self._receiver: threading.Thread | None = None
        self._tasks: list[asyncio.Task] = []
        self._welcomes: set[asyncio.Task] = set()
        self._welcome_budget = WELCOME_RATE  # a token bucket: WELCOME_RATE per second
        self._welcome_budget_at = time.monotonic()
        self._on_change: list[Callable[[], None]] = []
        self._on_lost: list[Callable[[str], None]] = []

    def subscribe(
        self, on_change: Callable[[], None], on_lost: Callable[[str], None]
    ) -> None:
        """``on_change()`` after any heartbeat or join; ``on_lost(name)`` when a worker dies."""
        self._on_change.append(on_change)
        self._on_lost.append(on_lost)

    def unsubscribe(self, on_change: Callable[[], None], on_lost: Callable[[str], None]) -> None:
        if on_change in self._on_change:
            self._on_change.remove(on_change)
        if on_lost in self._on_lost:
            self._on_lost.remove(on_lost)

    async def start(self, address: str) -> None:
        now = time.time()
        for row in await self.store.known_workers():
            if len(self.workers) < self.max_workers and now - row["last_seen"] < self.forget_after:
                self.workers[row["name"]] = WorkerInfo(row["name"], row["tags"], last_seen=row["last_seen"],
                                                       last_seen_mono=time.monotonic() - (now - row["last_seen"]))
        self._sock = pynng.Sub0(recv_max_size=wire.MAX_MESSAGE_BYTES)
        self._sock.subscribe(b"")  # without this a Sub0 silently receives nothing
        if self.tls is not None:
            self._sock.tls_config = self.tls.listener()
        self._sock.listen(address)
        self._receiver = threading.Thread(target=self._receive_thread, args=(asyncio.get_running_loop(),),
                                          name="membership-recv", daemon=True)
        self._receiver.start()
        self._tasks = [asyncio.create_task(self._sweep_loop(), name="membership-sweep")]
        logger.info("controller listening on %s (epoch %s)", address, self.epoch)

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()  # first: the receiving thread's wait ends (pynng.Closed)
        if self._receiver is not None:
            await asyncio.to_thread(self._receiver.join, 5.0)
            self._receiver = None
        sessions = list(self.sessions.values())
        self.sessions.clear()
        for session in sessions:
            await session.close("the server is stopping")
        await stop_tasks([*self._tasks, *self._welcomes, *self._closing])

    def snapshot(self) -> list[WorkerInfo]:
        return list(self.workers.values())

    def member(self, name: str) -> WorkerInfo | None:
        """What is known of worker ``name`` (alive or not), or None."""
        return self.workers.get(name)

    # -- talking to workers -----------------------------------------------------------------

    async def call(self, name: str, msg: wire.RunJob | wire.CancelJob, timeout: float) -> wire.Message:
        """Through ``name``'s session: run a job (its :class:`~plane.wire.JobResult` once it
        ended), or cancel one (an :class:`~plane.wire.Ack` once its work has stopped)."""
        session = self.sessions.get(name)
        if session is None:
            raise RpcError(f"worker {name} is not a member")
        if isinstance(msg, wire.RunJob):
            return await session.run(msg, timeout)
        await session.stop(msg.job_id, timeout)
        return wire.Ack()

    def credit(self, name: str) -> None:
        """A result of ``name``'s was stored: toward more trusted slots (up to its claim)."""
        info = self.workers.get(name)
        if info is not None:
            info.credit()

    # -- receiving --------------------------------------------------------------------------

    def _receive_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        """A thread of its own receives (a blocking receive, the GIL released while it waits)
        and hands the loop every message that arrived meanwhile in one call. Measured with 64
        idle workers: pynng's asyncio receive (an nng aio and a wake-up of the loop per message)
        cost the server 1.0 ms of CPU per heartbeat."""
        sock = self._sock
        assert sock is not None
        while True:
            try:
                batch = [sock.recv_msg()]
                while len(batch) < RECEIVE_BATCH:
                    batch.append(sock.recv_msg(block=False))
            except pynng.TryAgain:
                pass
            except pynng.Closed:
                return
            except pynng.NNGException as e:
                logger.debug("receive failed: %s", e)
                continue
            try:
                loop.call_soon_threadsafe(self._on_batch, batch)
            except RuntimeError:
                return  # the loop is closed

    def _on_batch(self, batch: list[pynng.Message]) -> None:
        if self._receiver is None:
            return  # closed meanwhile
        for message in batch:
            try:
                self._on_message(message.bytes, message)
            except wire.VersionError as e:
                self._refuse(f"{e}: a worker of another version of DPIP (upgrade it, or the server)")
            except wire.DecodeError as e:
                self.bad_messages += 1
                self._log.warning("bad", "dropped bad message on controller (%d so far): %s",
                                  self.bad_messages, e)
            except Exception:  # a bug must cost one message, never the loop
                self._log.log(logging.ERROR, "bug", "controller failed on a message", exc_info=True)

    def _on_message(self, data: bytes, source: str | pynng.Message = "") -> None:
        """One message from the pub/sub socket; ``source`` is the host it came from (or the
        message, to ask only for a hello)."""
        msg = wire.decode(data)
        if isinstance(msg, wire.Hello):
            return self._refuse(f"hello from {msg.name!r} without the join token's seal (a worker on"
                                " another machine needs DPIP_JOIN_TOKEN)")
        if not isinstance(msg, wire.Sealed):
            return self._refuse(f"unsealed {msg.TYPE}")
        if msg.kid == JOIN:
            try:
                inner = open_with(self.join, msg, W2C)
            except SealError:
                return self._refuse("hello with a wrong join token")
            if not isinstance(inner, wire.Hello):
                return self._refuse(f"{inner.TYPE} sealed with the join key")
            return self._on_hello(inner, source if isinstance(source, str) else source_host(source))
        info = self._by_kid.get(msg.kid)
        if info is None or info.channel is None:
            if msg.kid in self._left:
                return None  # the second copy of a goodbye (sent twice: pub/sub may drop one)
            return self._refuse("sealed with an unknown or expired session key")
        try:
            inner, fresh = info.channel.open(msg)
        except SealError:
            return self._refuse("a bad seal")
        if not fresh:
            return self._refuse("a replayed message")
        if getattr(inner, "name", None) != info.name or getattr(inner, "session", None) != info.session:
            return self._refuse("a message naming another worker")
        if isinstance(inner, wire.Heartbeat):
            self._on_heartbeat(info, inner)
        elif isinstance(inner, wire.Goodbye):
            if info.alive or info.welcomed:
                assert info.channel is not None
                self._left[info.channel.kid] = None
                while len(self._left) > 1024:
                    self._left.popitem(last=False)
                self._lose(info, "it said goodbye")
        else:
            self._refuse(f"a sealed {inner.TYPE} on the controller")

    def _refuse(self, why: str) -> None:
        self.refused += 1
        self._log.warning("refused", "refused %s (%d refused so far)", why, self.refused)

    def _on_hello(self, hello: wire.Hello, source: str = "") -> None:
        info = self.workers.get(hello.name)
        now = time.monotonic()
        if not source:
            # Its connection closed before we read it (a worker restarting, make run stopping):
            # nobody to answer and nothing proven against anyone, so no alarm either.
            self.vanished += 1
            logger.debug("dropped a hello from %r whose connection is gone (%d so far)", hello.name[:40], self.vanished)
            return None
        if not same_host(hello.rpc_address, source):
            return self._refuse(f"a hello from {source} naming another host's address"
                                f" ({hello.rpc_address[:80]!r}): a worker is dialed where it is")
        if is_tls(hello.rpc_address) != (self.tls is not None):
            return self._refuse(f"a hello from {hello.name!r} with an RPC address in clear (it needs --tls-ca)"
                                if self.tls else f"a hello from {hello.name!r} serving TLS, to a server without it")
        if info is not None and info.welcomed and info.session == hello.session:
            # A member saying it is still here (or a hello sent before it took its welcome):
            # its sealed heartbeats prove which key it holds; if they stop, it is lost and
            # its next hello welcomes it again.
            return
        if info is not None and info.alive and now - info.last_seen_mono < self.ttl \
                and info.rpc_address != hello.rpc_address:
            return self._refuse(f"a second worker named {hello.name!r} while the first is alive")
        if info is None and len(self.workers) >= self.max_workers and not self._forget_one():
            return self._refuse(f"a new worker: already tracking {self.max_workers}")
        join = self._joins.get(hello.name)
        if join is None:
            if len(self._joins) >= MAX_PENDING:
                oldest = next((k for k, j in self._joins.items() if not j.busy), None)
                if oldest is None:
                    return self._refuse("a join: too many in progress")
                del self._joins[oldest]
            join = self._joins[hello.name] = _Join()
        if join.busy or now - join.tried < WELCOME_RETRY:
            return
        if len(self._welcomes) >= MAX_WELCOMING or not self._take_welcome_budget(now):
            return self._refuse("a join: too many welcomes at once (tried again at its next hello)")
        join.busy, join.tried = True, now
        task = asyncio.create_task(self._welcome(hello, join), name=f"welcome-{hello.name}")
        self._welcomes.add(task)  # kept, so close() can stop it and it is not collected
        task.add_done_callback(self._welcomes.discard)

    def _take_welcome_budget(self, now: float) -> bool:
        refill = max(0.0, now - self._welcome_budget_at) * WELCOME_RATE
        self._welcome_budget = min(WELCOME_RATE, self._welcome_budget + refill)
        self._welcome_budget_at = now
        if self._welcome_budget < 1.0:
            return False
        self._welcome_budget -= 1.0
        return True

    async def _welcome(self, hello: wire.Hello, join: _Join) -> None:
        """Offer a session (its key derived from the join key, never sent) at the hello's
        address; a member once it acks with that key."""
        try:
            # One dial per second at most: an address that accepts and drops connections is
            # not hammered for the welcome's whole timeout.
            # With TLS, the worker's certificate must name the worker (checked by the handshake
            # when there is a client CA): a certificate for one name cannot join as another.
            client = RpcClient(hello.rpc_address, timeout=WELCOME_TIMEOUT, reconnect_min=1.0,
                               tls=self.tls.dialer(hello.name) if self.tls is not None else None)
        except pynng.NNGException as e:
            join.busy = False
            return self._refuse(f"a hello with an unusable address ({e})")
        adopted = False
        try:
            kid = secrets.token_hex(8)
            key = session_key(self.join, self.epoch, hello.session, kid)
            msg = wire.Welcome(self.epoch, hello.session, kid, "", self.api_port, self.public_url,
                               self.heartbeat_interval, self.limits.max_pixels, self.limits.max_pixel_steps)
            msg = dataclasses.replace(msg, proof=welcome_proof(self.join, msg))
            channel = Channel(key, kid, send=C2W, recv=W2C)
            try:
                reply = await client.call(msg, channel=WelcomeReply(channel))
            except RpcError as e:
                self.welcomes_failed += 1
                self._log.warning("welcome", "could not welcome worker %s at %s: %s%s", hello.name,
                                  hello.rpc_address, e, "" if self.tls is None or not self.tls.mutual else
                                  " (or its certificate is not of the client CA, or does not name it)")
                return
            if not isinstance(reply, wire.Joined) or not reply.session_port:
                self._refuse(f"a welcome answered without a session port by {hello.name!r}: a worker of"
                             " another version of DPIP (upgrade it)")
                return
            declared = self.catalog.without_conflicts(hello.name, read_all(hello.name, reply.filters)) \
                if reply.declares else None  # (None: the server's built-ins)
            adopted = self._adopt(hello, channel, declared, reply.session_port)
            if adopted:
                await self.store.upsert_worker(hello.name, self.workers[hello.name].tags, hello.rpc_address)
        except Exception:  # a bug must cost one welcome, never leave the name stuck
            self._log.log(logging.ERROR, "bug", "welcoming %s failed", hello.name, exc_info=True)
        finally:
            join.busy = False
            client.close()  # its part is done: the session has its own connection

    def _adopt(self, hello: wire.Hello, channel: Channel,
               declared: dict[str, tuple[FilterSpec, bool]] | None = None, session_port: int = 0) -> bool:
        """The worker proved its session: make it the member of that name."""
        info = self.workers.get(hello.name)
        if info is not None and info.alive and info.session != hello.session:
            if time.monotonic() - info.last_seen_mono < self.ttl and info.rpc_address != hello.rpc_address:
                return False  # the first holder came back meanwhile
            self._lose(info, "restarted")
        if info is None:
            if len(self.workers) >= self.max_workers and not self._forget_one():
                return False
            info = self.workers[hello.name] = WorkerInfo(hello.name)
        if info.channel is not None:
            self._by_kid.pop(info.channel.kid, None)
        self._end_session(info.name, "welcomed again")
        if not info.welcomed:
            logger.info("welcomed worker %s at %s", hello.name, hello.rpc_address)
        if info.session != hello.session:
            info.distrust()  # another process: it proves itself again
        info.session, info.rpc_address = hello.session, hello.rpc_address
        info.declare(declared)
        info.channel, info.state, info.welcomed_at = channel, WorkerState.WELCOMED, time.monotonic()
        info.last_seen_mono = time.monotonic()  # the TTL runs from the welcome
        self._by_kid[channel.kid] = info
        session = self.sessions[info.name] = Session(info.name, host_of(hello.rpc_address), session_port, channel,
                                                     self._session_tls, stats=self.plane)
        session.start()
        self._notify_change()
        return True

    def _on_heartbeat(self, info: WorkerInfo, hb: wire.Heartbeat) -> None:
        info.tags = list(hb.tags)
        info.cpu_percent = hb.cpu_percent
        info.memory_percent = hb.memory_percent
        info.gpu = hb.gpu
        info.running_jobs = hb.running_jobs
        info.waiting_jobs = hb.waiting_jobs
        info.capacity = hb.capacity
        info.prefetch = hb.prefetch
        info.jobs_done = hb.jobs_done
        info.running_job_ids = list(hb.running_job_ids)
        info.last_seen = time.time()
        info.last_seen_mono = time.monotonic()
        was_alive = info.alive
        info.state = WorkerState.DRAINING if hb.draining else WorkerState.ALIVE
        if not was_alive:
            logger.info("worker %s is alive at %s (tags %s, capacity %d)",
                        info.name, info.rpc_address, ",".join(hb.tags) or "-", hb.capacity)
        self._notify_change()

    # -- expiry -----------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(min(0.5, self.ttl / 4))
            try:
                await self.sweep()
            except Exception:
                self._log.log(logging.ERROR, "sweep", "membership sweep failed", exc_info=True)

    async def sweep(self) -> None:
        """Declare silent workers dead; forget those dead for longer than ``forget_after``."""
        now = time.monotonic()
        for info in list(self.workers.values()):
            if info.welcomed and now - info.last_seen_mono > self.ttl:
                self._lose(info, f"silent for more than {self.ttl:.1f}s")
            elif not info.alive and now - info.last_seen_mono > self.forget_after:
                await self.forget(info.name)

    async def forget(self, name: str) -> None:
        """Drop a dead worker from the list (and the datastore); a live one stays."""
        info = self.workers.get(name)
        if info is None or info.alive:
            return
        del self.workers[name]
        await self.store.forget_worker(name)
        logger.info("forgot worker %s", name)
        self._notify_change()

    def _forget_one(self) -> bool:
        """Make room: forget the longest-dead worker, if any is dead."""
        dead = [w for w in self.workers.values() if w.state == WorkerState.GONE]
        if not dead:
            return False
        oldest = min(dead, key=lambda w: w.last_seen_mono)
        del self.workers[oldest.name]
        return True

    def _lose(self, info: WorkerInfo, why: str) -> None:
        """Dead or gone: its session key and capabilities die, its jobs are requeued."""
        (logger.info if why == "it said goodbye" else logger.warning)("worker %s is gone: %s", info.name, why)
        info.state = WorkerState.GONE
        info.running_jobs = 0
        info.running_job_ids = []
        info.cpu_percent = info.memory_percent = 0.0
        info.gpu = wire.Gpu()
        if info.channel is not None:
            self._by_kid.pop(info.channel.kid, None)
            info.channel = None
        self._end_session(info.name, f"gone ({why})")
        for cb in self._on_lost:
            cb(info.name)

    def _end_session(self, name: str, why: str) -> None:
        session = self.sessions.pop(name, None)
        if session is not None:
            task = asyncio.create_task(session.close(why), name=f"close-{name}")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _notify_change(self) -> None:
        for cb in self._on_change:
            cb()
