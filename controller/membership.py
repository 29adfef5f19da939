"""Worker membership over nng pub/sub: register, heartbeat, expire after a TTL.

Workers dial the controller's Sub0 socket with a Pub0 and publish a :class:`~common.wire.Heartbeat`
every second. A heartbeat from a worker this controller has not welcomed (new, restarted,
back from a partition, or a controller restart) makes the controller call the worker's RPC
address with a :class:`~common.wire.Welcome`: the API port and a worker token. A worker silent
for ``ttl`` seconds is dead; listeners are told so they can requeue its jobs.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pynng

from common import wire
from common.aio import stop_tasks
from common.rpc import RpcClient, RpcError
from controller.auth import WORKER, Auth
from controller.store import Store

logger = logging.getLogger(__name__)


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
    last_seen_mono: float = 0.0  # monotonic, for the TTL
    alive: bool = False
    welcomed: bool = False
    draining: bool = False
    running_job_ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
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
            "rpc_address": self.rpc_address,
        }


class Membership:
    """The controller's view of the workers, kept fresh by heartbeats."""

    def __init__(
        self,
        store: Store,
        auth: Auth,
        api_port: int,
        public_url: str,
        heartbeat_interval: float = 1.0,
        ttl: float = 3.0,
        join_token: str = "",
    ) -> None:
        self.store = store
        self.auth = auth
        self.api_port = api_port
        self.public_url = public_url
        self.heartbeat_interval = heartbeat_interval
        self.ttl = ttl
        self.join_token = join_token  # if set, heartbeats must prove they know it
        self.refused = 0
        self._refused_logged: set[tuple[str, str]] = set()
        self.epoch = uuid.uuid4().hex[:12]  # changes each start: workers get re-welcomed
        self.workers: dict[str, WorkerInfo] = {}
        self.clients: dict[str, RpcClient] = {}
        self.bad_messages = 0
        self._welcoming: set[str] = set()
        self._sock: pynng.Sub0 | None = None
        self._tasks: list[asyncio.Task] = []
        self._welcomes: set[asyncio.Task] = set()
        self._on_change: list[Callable[[], None]] = []
        self._on_lost: list[Callable[[str], None]] = []

    def subscribe(
        self, on_change: Callable[[], None], on_lost: Callable[[str], None]
    ) -> None:
        """``on_change()`` after any heartbeat or join; ``on_lost(name)`` when a worker dies."""
        self._on_change.append(on_change)
        self._on_lost.append(on_lost)

    async def start(self, address: str) -> None:
        for row in await self.store.known_workers():
            self.workers[row["name"]] = WorkerInfo(row["name"], row["tags"], last_seen=row["last_seen"])
        self._sock = pynng.Sub0(recv_max_size=wire.MAX_MESSAGE_BYTES)
        self._sock.subscribe(b"")  # without this a Sub0 silently receives nothing
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

    def client(self, name: str) -> RpcClient | None:
        return self.clients.get(name)

    # -- loops ------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = await self._sock.arecv()
            except pynng.Closed:
                return
            try:
                msg = wire.decode(data)
                if not isinstance(msg, (wire.Heartbeat, wire.Goodbye)):
                    raise wire.DecodeError(f"expected a heartbeat or goodbye, got {msg.TYPE}")
            except wire.DecodeError as e:
                self.bad_messages += 1
                if self.bad_messages == 1 or self.bad_messages % 100 == 0:
                    logger.warning("dropped bad message on controller (%d so far): %s", self.bad_messages, e)
                continue
            if isinstance(msg, wire.Goodbye):
                self._on_goodbye(msg)
            else:
                self._on_heartbeat(msg)

    def _on_goodbye(self, msg: wire.Goodbye) -> None:
        # Unauthenticated, but it must name a live worker's session (a random 128-bit id that
        # only that worker and the controller see), so it cannot be guessed to evict one.
        info = self.workers.get(msg.name)
        if info is not None and info.alive and info.session == msg.session:
            self._lose(info, "it said goodbye")

    def _on_heartbeat(self, hb: wire.Heartbeat) -> None:
        if self.join_token:
            expected = wire.join_proof(self.join_token, hb.name, hb.session, hb.rpc_address)
            if not hmac.compare_digest(hb.join_proof, expected):
                self.refused += 1
                if (hb.name, hb.rpc_address) not in self._refused_logged:
                    self._refused_logged.add((hb.name, hb.rpc_address))
                    logger.warning("ignoring worker %r at %s: missing or wrong join token",
                                   hb.name, hb.rpc_address)
                return
        info = self.workers.get(hb.name)
        now = time.monotonic()
        if info is not None and info.alive and info.session and info.session != hb.session:
            if now - info.last_seen_mono < self.ttl and info.rpc_address != hb.rpc_address:
                # Two live processes claim one name: keep the first, ignore the newcomer.
                logger.warning("ignoring a second worker named %r at %s", hb.name, hb.rpc_address)
                return
            self._lose(info, "restarted")
        if info is None:
            info = self.workers[hb.name] = WorkerInfo(hb.name)
        if info.rpc_address and info.rpc_address != hb.rpc_address and hb.name in self.clients:
            self.clients.pop(hb.name).close()
            info.welcomed = False
        info.tags = list(hb.tags)
        info.session = hb.session
        info.rpc_address = hb.rpc_address
        info.cpu_percent = hb.cpu_percent
        info.memory_percent = hb.memory_percent
        info.gpu = hb.gpu
        info.running_jobs = hb.running_jobs
        info.capacity = hb.capacity
        info.jobs_done = hb.jobs_done
        info.draining = hb.draining
        info.running_job_ids = list(hb.running_job_ids)
        info.last_seen = time.time()
        info.last_seen_mono = now
        if not info.alive:
            info.alive = True
            logger.info("worker %s is alive at %s (tags %s, capacity %d)",
                        hb.name, hb.rpc_address, ",".join(hb.tags) or "-", hb.capacity)
        if (not info.welcomed or hb.welcomed_by != self.epoch) and hb.name not in self._welcoming:
            self._welcoming.add(hb.name)
            task = asyncio.create_task(self._welcome(info), name=f"welcome-{hb.name}")
            self._welcomes.add(task)  # kept, so close() can stop it and it is not collected
            task.add_done_callback(self._welcomes.discard)
        self._notify_change()

    async def _welcome(self, info: WorkerInfo) -> None:
        try:
            client = self.clients.get(info.name)
            if client is None:
                client = self.clients[info.name] = RpcClient(info.rpc_address, timeout=3.0)
            token = self.auth.issue(info.name, WORKER)
            proof = wire.join_proof(self.join_token, self.epoch, self.api_port, self.public_url, token)
            msg = wire.Welcome(self.epoch, self.api_port, self.public_url, token,
                               self.heartbeat_interval, proof)
            reply = await client.call(msg)
            if isinstance(reply, wire.Ack) and reply.ok:
                if not info.welcomed:
                    logger.info("welcomed worker %s", info.name)
                info.welcomed = True
                await self.store.upsert_worker(info.name, info.tags, info.rpc_address)
                self._notify_change()
            else:
                logger.warning("worker %s refused the welcome: %s", info.name, reply)
        except RpcError as e:
            logger.warning("could not welcome worker %s: %s", info.name, e)
        finally:
            self._welcoming.discard(info.name)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(min(0.5, self.ttl / 4))
            cutoff = time.monotonic() - self.ttl
            for info in list(self.workers.values()):
                if info.alive and info.last_seen_mono < cutoff:
                    self._lose(info, f"silent for more than {self.ttl:.1f}s")

    def _lose(self, info: WorkerInfo, why: str) -> None:
        logger.warning("worker %s is gone: %s", info.name, why)
        info.alive = False
        info.welcomed = False
        info.running_jobs = 0
        info.running_job_ids = []
        client = self.clients.pop(info.name, None)
        if client is not None:
            client.close()
        for cb in self._on_lost:
            cb(info.name)

    def _notify_change(self) -> None:
        for cb in self._on_change:
            cb()
