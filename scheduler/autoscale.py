"""Elastic workers: start workers when queued jobs outnumber the free slots, retire the ones we
started after they have been idle a while.

:func:`decide` is the policy, a pure function of one instant (tested without processes);
:class:`Autoscaler` samples the scheduler and membership twice a second, applies decisions
through a :class:`~scheduler.provision.Provisioner`, and tracks each worker it started:

    launching --(heartbeat: alive)--> alive --(idle >= idle_timeout, nothing queued)--> retiring --> gone
        \\--(not alive after launch_timeout)--> failed (stopped, may be replaced)

Workers it did not start are never retired; they count as supply like any other.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from common.aio import stop_tasks
from controller.membership import Membership
from scheduler.provision import Provisioner, ProvisionError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScalePolicy:
    minimum: int = 0
    maximum: int = 1
    idle_timeout: float = 30.0  # an autoscaled worker idle this long is retired (down to minimum)
    up_cooldown: float = 2.0  # at least this long between two scale-ups
    down_cooldown: float = 2.0  # and between two retirements: no flapping, one step at a time
    launch_timeout: float = 30.0  # a worker not alive this long after its launch command returned has failed
    max_backoff: float = 60.0  # after failed launches, wait 2, 4, 8 ... up to this before the next
    worker_capacity: int = 1  # slots a worker brings, assumed until ours report their own


class Phase(str, Enum):
    LAUNCHING = "launching"
    ALIVE = "alive"
    RETIRING = "retiring"


@dataclass
class Managed:
    """A worker the autoscaler started."""

    name: str
    phase: Phase = Phase.LAUNCHING
    launched_at: float | None = 0.0  # None while the launch command still runs
    idle_since: float | None = None  # None while it has jobs
    capacity: int = 0  # as it reports; 0 until its first heartbeat


@dataclass(frozen=True)
class Fleet:
    """One instant, as the policy sees it."""

    now: float
    queued: int  # jobs waiting for a slot
    free_slots: int  # on ready workers, ours and everyone's
    managed: tuple[Managed, ...]


@dataclass(frozen=True)
class Decision:
    action: str  # "launch" | "retire" | "hold"
    reason: str
    count: int = 0  # workers to launch
    name: str = ""  # the worker to retire


def decide(fleet: Fleet, policy: ScalePolicy, last_up: float, last_down: float) -> Decision:
    """What to do now. Launch while the queue exceeds the free slots plus those on their way;
    retire one idle worker of ours at a time once nothing is queued."""
    active = [m for m in fleet.managed if m.phase != Phase.RETIRING]
    launching = [m for m in active if m.phase == Phase.LAUNCHING]
    if len(active) < policy.minimum and fleet.now - last_up >= policy.up_cooldown:
        return Decision("launch", f"{len(active)} autoscaled workers, below the minimum of {policy.minimum}",
                        count=policy.minimum - len(active))
    coming = sum(m.capacity or policy.worker_capacity for m in launching)
    short = fleet.queued - fleet.free_slots - coming
    if fleet.queued > 0 and short > 0:
        if len(active) >= policy.maximum:
            return Decision("hold", f"{fleet.queued} jobs queued, already at the maximum of {policy.maximum}")
        if fleet.now - last_up < policy.up_cooldown:
            return Decision("hold", f"{fleet.queued} jobs queued; cooling down after the last launch")
        count = min(policy.maximum - len(active), math.ceil(short / policy.worker_capacity))
        return Decision("launch", f"{fleet.queued} jobs queued, {fleet.free_slots} free slots and {coming} on"
                                  f" their way: {short} short", count=count)
    if fleet.queued == 0 and len(active) > policy.minimum:
        idle = [m for m in active if m.phase == Phase.ALIVE and m.idle_since is not None
                and fleet.now - m.idle_since >= policy.idle_timeout]
        if idle:
            if fleet.now - last_down < policy.down_cooldown:
                return Decision("hold", "idle workers; cooling down after the last retirement")
            oldest = min(idle, key=lambda m: m.idle_since or 0.0)
            return Decision("retire", f"idle for {fleet.now - (oldest.idle_since or 0):.0f} s"
                                      f" (idle timeout {policy.idle_timeout:g} s)", name=oldest.name)
    if fleet.queued:
        return Decision("hold", f"{fleet.queued} jobs queued, enough slots free or coming")
    return Decision("hold", "nothing queued")


@dataclass
class Record:
    """The last decision that did something, and the last one at all (for /status)."""

    action: str = "hold"
    reason: str = "not started"
    at: float = 0.0  # wall clock


class SlotsView(Protocol):
    """What the autoscaler reads of the scheduler."""

    def slots(self) -> dict[str, tuple[int, int]]: ...
    def queued_for(self, tags: frozenset[str] | None) -> int: ...


class Autoscaler:
    TICK = 0.5

    def __init__(self, policy: ScalePolicy, provisioner: Provisioner, scheduler: SlotsView,
                 membership: Membership, worker_tags: frozenset[str] | None = None) -> None:
        self.policy = policy
        # The tags our workers will have (None: unknown). Jobs needing others are not our demand:
        # scaling cannot help them, and they must not keep our idle workers alive.
        self.worker_tags = worker_tags
        self.provisioner = provisioner
        self.scheduler = scheduler
        self.membership = membership
        self.managed: dict[str, Managed] = {}
        self.last_action = Record()
        self.last_decision = Record()
        self.launched = 0
        self.retired = 0
        self.failed = 0
        self._last_up = -math.inf  # pushed into the future after failed launches (backoff)
        self._last_down = -math.inf
        self._failures_in_a_row = 0
        self._serial = 0
        self._task: asyncio.Task | None = None
        self._ops: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="autoscaler")
        logger.info("autoscaling %d..%d workers with %s (idle timeout %g s)", self.policy.minimum,
                    self.policy.maximum, self.provisioner.describe(), self.policy.idle_timeout)

    async def close(self) -> None:
        """Stop deciding, then stop every worker we started (they drain first)."""
        tasks = [t for t in (self._task, *self._ops) if t is not None]
        await stop_tasks(tasks)
        await self.provisioner.close()

    def is_managed(self, name: str) -> bool:
        return name in self.managed

    def describe(self) -> dict:
        return {
            "minimum": self.policy.minimum, "maximum": self.policy.maximum,
            "idle_timeout": self.policy.idle_timeout, "provisioner": self.provisioner.describe(),
            "workers": {m.name: m.phase.value for m in self.managed.values()},
            "launched": self.launched, "retired": self.retired, "failed": self.failed,
            "last_action": vars(self.last_action).copy(),
            "last_decision": vars(self.last_decision).copy(),
        }

    # -- the loop ---------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                self._tick(time.monotonic())
            except Exception:  # a bug here must not stop the server
                logger.exception("autoscaler tick failed")
            await asyncio.sleep(self.TICK)

    def _tick(self, now: float) -> None:
        slots = self.scheduler.slots()
        self._observe(now, slots)
        fleet = Fleet(now, self.scheduler.queued_for(self.worker_tags),
                      sum(max(0, cap - used) for used, cap in slots.values()),
                      tuple(self.managed.values()))
        d = decide(fleet, self.policy, self._last_up, self._last_down)
        self.last_decision = Record(d.action, d.reason, time.time())
        if d.action == "launch":
            self._last_up = now
            for _ in range(d.count):
                self._launch(now, d.reason)
        elif d.action == "retire":
            self._last_down = now
            self._retire(d.name, d.reason)

    def _observe(self, now: float, slots: dict[str, tuple[int, int]]) -> None:
        """Move our workers along their states from what membership and the scheduler say."""
        workers = {w.name: w for w in self.membership.snapshot()}
        for m in list(self.managed.values()):
            w = workers.get(m.name)
            if m.phase == Phase.LAUNCHING:
                if w is not None and w.alive and m.name in slots:
                    m.phase, m.capacity, m.idle_since = Phase.ALIVE, w.capacity, now
                    self._failures_in_a_row = 0
                    logger.info("autoscaled worker %s is up", m.name)
                elif m.launched_at is not None and (now - m.launched_at > self.policy.launch_timeout
                                                    or self.provisioner.exited(m.name)):
                    self._failed(now, m, f"not alive {now - m.launched_at:.0f} s after its launch")
                    self._spawn(self.provisioner.retire(m.name))
                continue
            if m.phase == Phase.RETIRING:
                if self.provisioner.exited(m.name) or w is None or not w.alive:
                    self._forget(m, "retired")
                    self._spawn(self.membership.forget(m.name))  # gone for good: not in /status
                continue
            if w is None or not w.alive or self.provisioner.exited(m.name):
                self._forget(m, "it died")  # replaced by the policy if still needed
                continue
            busy = slots.get(m.name, (0, 0))[0] > 0 or w.running_jobs > 0
            m.capacity = w.capacity
            m.idle_since = None if busy else (m.idle_since if m.idle_since is not None else now)

    def _launch(self, now: float, reason: str) -> None:
        self._serial += 1
        name = f"auto-{self._serial}"
        while name in self.managed or any(w.name == name and w.alive for w in self.membership.snapshot()):
            self._serial += 1
            name = f"auto-{self._serial}"
        managed = self.managed[name] = Managed(name, Phase.LAUNCHING, None)
        self.launched += 1
        self.last_action = Record("launch", f"{name}: {reason}", time.time())
        logger.info("autoscale: launching %s: %s", name, reason)

        async def launch() -> None:
            try:
                await self.provisioner.launch(name)
            except ProvisionError as e:
                if name in self.managed:
                    self._failed(time.monotonic(), managed, f"launch failed: {e}")
                return
            managed.launched_at = time.monotonic()  # the launch timeout runs from here

        self._spawn(launch())

    def _failed(self, now: float, m: Managed, why: str) -> None:
        """A launch that did not give a live worker: forget it and hold the next one back."""
        self.failed += 1
        self._failures_in_a_row += 1
        backoff = min(self.policy.max_backoff, 2.0 ** self._failures_in_a_row)
        self._last_up = max(self._last_up, now + backoff - self.policy.up_cooldown)
        self._forget(m, f"{why}; next launch in {backoff:.0f} s at the earliest")

    def _retire(self, name: str, reason: str) -> None:
        self.managed[name].phase = Phase.RETIRING
        self.retired += 1
        self.last_action = Record("retire", f"{name}: {reason}", time.time())
        logger.info("autoscale: retiring %s: %s", name, reason)
        self._spawn(self.provisioner.retire(name))

    def _forget(self, m: Managed, why: str) -> None:
        self.managed.pop(m.name, None)
        logger.log(logging.INFO if why == "retired" else logging.WARNING, "autoscaled worker %s: %s", m.name, why)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._ops.add(task)
        task.add_done_callback(self._ops.discard)
