"""Worker membership over nng pub/sub: join, heartbeat, expire after a TTL, forget.

Workers dial the controller's Sub0 socket with a Pub0. A :class:`~common.wire.Hello`, sealed
with the join key (every controller has a join token: given, or generated and left for this
machine's workers, :mod:`common.localjoin`), makes the controller call the RPC address it names,
on the host the hello came from, with a :class:`~common.wire.Welcome` from which both derive a
session key (never sent); the worker is a member once it acknowledges with that key. From then
on only sealed, fresh heartbeats count: they keep it alive; a worker silent for ``ttl`` seconds
is dead (its session key and job capabilities die with it), listeners requeue its jobs, and it
is forgotten ``forget_after`` seconds later. The scheduler calls workers through
:meth:`Membership.call`, which seals.

A member's claimed capacity is trusted only as far as it has proven it (:meth:`WorkerInfo.slots`):
a newcomer gets a few slots, one more for each result of its that was stored.

Everything here is bounded against a hostile network: at most ``max_workers`` members and
``MAX_PENDING`` joins in progress, one welcome attempt per name at a time and per second,
``MAX_WELCOMING`` welcomes at once and ``WELCOME_RATE`` a second in all, and refusals are
counted and logged at a bounded rate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import pynng

from common import filters, wire
from common.filters import FilterSpec
from common.offers import specs_of
from common.pipeline import Limits
from common.aio import stop_tasks
from common.logs import LogLimiter
from common.rpc import RpcClient, RpcError
from common.tls import ServerTls, is_tls
from common.seal import C2W, JOIN, W2C, Channel, SealError, join_key, open_with, session_key, welcome_proof
from controller import capability
from controller.capability import JobClaims
from common.models import Unauthorized
from storage.datastore import Datastore

logger = logging.getLogger(__name__)

#: What a worker that declares no filters runs: the built-ins of this server.
BUILTINS = tuple(n for n, s in filters.REGISTRY.items() if s.builtin)

MAX_PENDING = 256  # joins being welcomed or recently tried
WELCOME_RETRY = 1.0  # seconds between two welcome attempts for one name
MAX_WELCOMING = 32  # welcomes in flight at once, whatever the names
WELCOME_RATE = 20.0  # welcome attempts per second in all (a burst of as many)
WELCOME_TIMEOUT = 3.0  # seconds a welcome waits for the worker's acknowledgement
#: Slots a newcomer is trusted with before it has proven more (each stored result: one more).
TRUSTED_AT_FIRST = 2


class WorkerState(str, Enum):
    """Where a worker is in its life, as membership sees it.

    ``gone`` (not a member: never welcomed this run, lost, or left) -> welcome -> ``welcomed``
    -> first sealed heartbeat -> ``alive`` <-> ``draining`` (as its heartbeats say) -> silent for
    the TTL, a goodbye, or a restart under the same name -> ``gone``."""

    GONE = "gone"
    WELCOMED = "welcomed"
    ALIVE = "alive"
    DRAINING = "draining"


@dataclass
class WorkerInfo:
    """What the controller knows of one worker: its last heartbeat and its liveness."""

    name: str
    tags: list[str] = field(default_factory=list)
    session: str = ""
    rpc_address: str = ""
    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    gpu: wire.Gpu = field(default_factory=wire.Gpu)
    running_jobs: int = 0
    capacity: int = 0
    jobs_done: int = 0
    last_seen: float = 0.0  # wall clock, for people
    last_seen_mono: float = 0.0  # monotonic, for the TTL and forgetting
    state: WorkerState = WorkerState.GONE
    welcomed_at: float = 0.0  # monotonic
    running_job_ids: list[int] = field(default_factory=list)
    channel: Channel | None = field(default=None, repr=False)  # the session key; None when dead
    proven: int = 0  # its results stored this session (what its claimed capacity is trusted to)
    #: the filters it runs, as it declared them when it joined; None: it declared none (an
    #: older worker): the server's built-ins
    filters: dict[str, FilterSpec] | None = field(default=None, repr=False)
    filter_names: frozenset[str] = field(default_factory=lambda: frozenset(BUILTINS), repr=False)
    gpu_filters: frozenset[str] = field(default_factory=frozenset, repr=False)  # run on its GPU

    def declare(self, declared: dict[str, tuple[FilterSpec, bool]] | None) -> None:
        """Take what it declared when it joined: each filter, and whether it runs on its GPU."""
        self.filters = {n: spec for n, (spec, _) in declared.items()} if declared is not None else None
        self.filter_names = frozenset(declared) if declared is not None else frozenset(BUILTINS)
        self.gpu_filters = frozenset(n for n, (_, gpu) in (declared or {}).items() if gpu)

    @property
    def alive(self) -> bool:
        """Heartbeating (draining or not)."""
        return self.state in (WorkerState.ALIVE, WorkerState.DRAINING)

    @property
    def welcomed(self) -> bool:
        """A member: welcomed on its current session, whether it has heartbeated yet or not."""
        return self.state != WorkerState.GONE

    @property
    def draining(self) -> bool:
        return self.state == WorkerState.DRAINING

    @property
    def ready(self) -> bool:
        """It may be given jobs: alive, not draining, with room for some."""
        return self.state == WorkerState.ALIVE and self.capacity > 0

    def slots(self) -> int:
        """The jobs it may hold at once: what it claims, but no more than it has proven it can
        (a few at first, one more per stored result: a claim of 4096 wins nothing at once)."""
        return min(self.capacity, TRUSTED_AT_FIRST + self.proven)

    def to_json(self, admin: bool = False) -> dict:
        """The API's view; the RPC address (where to send jobs) is for admins only."""
        out = {
            "name": self.name,
            "tags": self.tags,
            "alive": self.alive,
            "cpu_percent": self.cpu_percent,
            "memory_percent": self.memory_percent,
            "gpu": {
                "count": self.gpu.count,
                "utilization_percent": self.gpu.utilization_percent,
                "memory_percent": self.gpu.memory_percent,
            },
            "running_jobs": self.running_jobs,
            "capacity": self.capacity,
            "jobs_done": self.jobs_done,
            "last_seen": self.last_seen,
            # compact (a worker's entry is sent again on the event stream whenever its load moves):
            # the names, the versions of those that have one (plugins), those run on its GPU
            "filters": list(self.filters) if self.filters is not None else list(BUILTINS),
            "filter_versions": {n: s.version for n, s in (self.filters or {}).items() if s.version},
            "gpu_filters": sorted(self.gpu_filters),
        }
        if admin:
            out["rpc_address"] = self.rpc_address
        return out


@dataclass
class _Join:
    """A hello being answered: when we last tried, whether a welcome is in flight."""

    tried: float = 0.0
    busy: bool = False


#: Distinct filter names the live fleet may declare in all (a thousand workers declaring a
#: hundred made-up names each would otherwise make every listing of them hundreds of MB).
MAX_FLEET_FILTERS = 256


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
        self.clients: dict[str, RpcClient] = {}
        self.refused = 0  # hellos, heartbeats and goodbyes that failed authentication
        self.vanished = 0  # hellos read after their connection had closed (dropped quietly)
        self.conflicts = 0  # declarations left out: unlike another worker's of that version, or too many
        self.bad_messages = 0
        self.welcomes_failed = 0  # hellos answered with a welcome that never got through
        self._cap_key = capability.derive_key(secret)
        self._by_kid: dict[str, WorkerInfo] = {}
        self._joins: OrderedDict[str, _Join] = OrderedDict()
        self._left: OrderedDict[str, None] = OrderedDict()  # key ids of workers that said goodbye
        self._log = LogLimiter(logger)
        self._sock: pynng.Sub0 | None = None
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
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="membership-recv"),
            asyncio.create_task(self._sweep_loop(), name="membership-sweep"),
        ]
        logger.info("controller listening on %s (epoch %s)", address, self.epoch)

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()  # first: fails the pending arecv (see common.aio.stop_tasks)
        for c in self.clients.values():
            c.close()
        self.clients.clear()
        await stop_tasks([*self._tasks, *self._welcomes])

    def snapshot(self) -> list[WorkerInfo]:
        return list(self.workers.values())

    def offered(self, name: str) -> FilterSpec | None:
        """Filter ``name`` as a live worker declared it (the first found), or None."""
        for info in self.workers.values():
            if info.alive and info.filters is not None and name in info.filters:
                return info.filters[name]
        return None

    def declaration(self, name: str) -> FilterSpec | None:
        """Filter ``name`` as this server has it, else as a live worker declared it."""
        return filters.REGISTRY.get(name) or self.offered(name)

    def all_declarations(self, name: str) -> list[FilterSpec]:
        """Every declaration of filter ``name`` a job may be placed on: this server's own, else
        each distinct one of the live workers (a workload must suit all of them)."""
        own = filters.REGISTRY.get(name)
        if own is not None:
            return [own]
        out: list[FilterSpec] = []
        for info in self.workers.values():
            spec = info.filters.get(name) if info.alive and info.filters is not None else None
            if spec is not None and spec not in out:
                out.append(spec)
        return out

    def filter_names(self) -> list[str]:
        """This server's filters, then every other one a live worker runs."""
        return list(dict.fromkeys([*filters.REGISTRY, *sorted(self.fleet_filters())]))

    def declarations(self, name: str) -> dict[str, FilterSpec] | None:
        """What worker ``name`` declared it runs (None: nothing known, or the built-ins)."""
        info = self.workers.get(name)
        return info.filters if info is not None else None

    def fleet_filters(self) -> dict[str, list[tuple[WorkerInfo, FilterSpec, bool]]]:
        """Every filter a live worker runs: who runs it, with its declaration there."""
        out: dict[str, list[tuple[WorkerInfo, FilterSpec, bool]]] = {}
        for info in self.workers.values():
            if not info.alive:
                continue
            if info.filters is None:
                for n in BUILTINS:
                    out.setdefault(n, []).append((info, filters.REGISTRY[n], False))
            else:
                for n, spec in info.filters.items():
                    out.setdefault(n, []).append((info, spec, n in info.gpu_filters))
        return out

    def member(self, name: str) -> WorkerInfo | None:
        """What is known of worker ``name`` (alive or not), or None."""
        return self.workers.get(name)

    # -- talking to workers -----------------------------------------------------------------

    async def call(self, name: str, msg: wire.Message, timeout: float) -> wire.Message:
        """Send ``msg`` sealed with ``name``'s session key; the reply must be sealed for it."""
        info = self.workers.get(name)
        client = self.clients.get(name)
        if info is None or info.channel is None or client is None:
            raise RpcError(f"worker {name} is not a member")
        return await client.call(msg, timeout=timeout, channel=info.channel)

    def credit(self, name: str) -> None:
        """A result of ``name``'s was stored: it is trusted with one more slot (up to its claim)."""
        info = self.workers.get(name)
        if info is not None and info.proven < info.capacity:
            info.proven += 1

    def capability(self, name: str, job_id: int, workload_id: str, image_id: int, filter_: str,
                   deadline: float) -> str:
        """An HTTP credential for this one job on this worker's current session."""
        info = self.workers.get(name)
        kid = info.channel.kid if info is not None and info.channel is not None else ""
        claims = JobClaims(job_id, workload_id, image_id, filter_, name, kid, self.epoch, deadline)
        return capability.issue(self._cap_key, claims)

    def check_capability(self, token: str) -> JobClaims:
        """A capability's claims, if it is genuine, unexpired, of this epoch, and its worker is
        still alive on the session it was issued to."""
        claims = capability.verify(self._cap_key, token)
        info = self.workers.get(claims.worker)
        if (claims.epoch != self.epoch or info is None or not info.alive or info.channel is None
                or info.channel.kid != claims.kid):
            raise Unauthorized("job capability no longer valid: its worker's session ended")
        return claims

    # -- receiving --------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                message = await self._sock.arecv_msg()
            except pynng.Closed:
                return
            except pynng.NNGException as e:
                logger.debug("receive failed: %s", e)
                continue
            try:
                self._on_message(message.bytes, _source_host(message))
            except wire.DecodeError as e:
                self.bad_messages += 1
                self._log.warning("bad", "dropped bad message on controller (%d so far): %s",
                                  self.bad_messages, e)
            except Exception:  # a bug must cost one message, never the loop
                self._log.log(logging.ERROR, "bug", "controller failed on a message", exc_info=True)

    def _on_message(self, data: bytes, source: str = "") -> None:
        """One message from the pub/sub socket; ``source`` is the host it came from."""
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
            return self._on_hello(inner, source)
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
        if not _same_host(hello.rpc_address, source):
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
                reply = await client.call(msg, channel=_WelcomeReply(channel))
            except RpcError as e:
                self.welcomes_failed += 1
                self._log.warning("welcome", "could not welcome worker %s at %s: %s%s", hello.name,
                                  hello.rpc_address, e, "" if self.tls is None or not self.tls.mutual else
                                  " (or its certificate is not of the client CA, or does not name it)")
                return
            if isinstance(reply, wire.Joined):
                declared = self._without_conflicts(hello.name, specs_of(hello.name, reply.filters))
            elif isinstance(reply, wire.Ack) and reply.ok:
                declared = None  # a worker that declares nothing runs the built-ins
            else:
                return
            adopted = self._adopt(hello, channel, client, declared)
            if adopted:
                await self.store.upsert_worker(hello.name, self.workers[hello.name].tags, hello.rpc_address)
        except Exception:  # a bug must cost one welcome, never leave the name stuck
            self._log.log(logging.ERROR, "bug", "welcoming %s failed", hello.name, exc_info=True)
        finally:
            join.busy = False
            if not adopted:
                client.close()

    def _without_conflicts(self, name: str, declared: dict[str, tuple[FilterSpec, bool]]
                           ) -> dict[str, tuple[FilterSpec, bool]]:
        """A worker's declarations less those that contradict another live worker's of the same
        filter name and version (one version of a plugin is one contract), and less new filter
        names past :data:`MAX_FLEET_FILTERS` fleet-wide; each left out is logged and counted."""
        fleet = {(n, spec.version): spec for n, held in self.fleet_filters().items()
                 for info, spec, _ in held if info.name != name}
        names = {n for n, _ in fleet}
        kept: dict[str, tuple[FilterSpec, bool]] = {}
        for n, (spec, gpu) in declared.items():
            other = fleet.get((n, spec.version))
            if other is not None and other != spec:
                self.conflicts += 1
                self._log.warning("conflict", "worker %s declares filter %s %s unlike the live workers that run"
                                  " it: left out there (%d so far)", name, n, spec.version or "(no version)",
                                  self.conflicts)
                continue
            if n not in names and len(names) >= MAX_FLEET_FILTERS:
                self.conflicts += 1
                self._log.warning("conflict", "worker %s declares filter %s past the fleet's %d: left out",
                                  name, n, MAX_FLEET_FILTERS)
                continue
            names.add(n)
            kept[n] = (spec, gpu)
        return kept

    def _adopt(self, hello: wire.Hello, channel: Channel, client: RpcClient,
               declared: dict[str, tuple[FilterSpec, bool]] | None = None) -> bool:
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
        old = self.clients.pop(info.name, None)
        if old is not None:
            old.close()
        if not info.welcomed:
            logger.info("welcomed worker %s at %s", hello.name, hello.rpc_address)
        if info.session != hello.session:
            info.proven = 0  # another process: it proves itself again
        info.session, info.rpc_address = hello.session, hello.rpc_address
        info.declare(declared)
        info.channel, info.state, info.welcomed_at = channel, WorkerState.WELCOMED, time.monotonic()
        info.last_seen_mono = time.monotonic()  # the TTL runs from the welcome
        self._by_kid[channel.kid] = info
        self.clients[info.name] = client
        self._notify_change()
        return True

    def _on_heartbeat(self, info: WorkerInfo, hb: wire.Heartbeat) -> None:
        info.tags = list(hb.tags)
        info.cpu_percent = hb.cpu_percent
        info.memory_percent = hb.memory_percent
        info.gpu = hb.gpu
        info.running_jobs = hb.running_jobs
        info.capacity = hb.capacity
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
        client = self.clients.pop(info.name, None)
        if client is not None:
            client.close()
        for cb in self._on_lost:
            cb(info.name)

    def _notify_change(self) -> None:
        for cb in self._on_change:
            cb()


def _source_host(message: pynng.Message) -> str:
    """The host a pub/sub message came from ("" if its connection is gone already)."""
    try:
        return str(message.pipe.remote_address).rsplit(":", 1)[0].strip("[]")
    except (pynng.NNGException, AttributeError, ValueError):
        return ""


def _same_host(rpc_address: str, source: str) -> bool:
    """Whether ``rpc_address`` (``tcp://HOST:PORT`` or ``tls+tcp://...``) is on the host a hello came from: a hello
    never makes the controller dial a third party. Loopback addresses are one host."""
    host = rpc_address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    try:
        a, b = ipaddress.ip_address(host), ipaddress.ip_address(source)
    except ValueError:
        return False  # a name, or no source: an address we cannot tie to the hello's sender
    a = a.ipv4_mapped or a if isinstance(a, ipaddress.IPv6Address) else a
    b = b.ipv4_mapped or b if isinstance(b, ipaddress.IPv6Address) else b
    return a == b or (a.is_loopback and b.is_loopback)


class _WelcomeReply:
    """Seals nothing (a welcome travels plain) but opens its reply: an Ack sealed with the new
    key for request 0, which proves the worker holds the session key."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def seal(self, msg: wire.Message) -> tuple[bytes, int]:
        return wire.encode(msg), 0

    def open_reply(self, data: bytes, request_seq: int) -> wire.Message:
        return self.channel.open_reply(data, 0)


