"""An in-process fake fleet (like dramatiq's StubBroker): the real scheduler, carrier and job
lifecycle on a real SQLite file, with workers that are plain objects behind a fake membership.
No processes, no sockets: fairness, retries, hedging and placement decisions are tested in
milliseconds, and each test decides when each job finishes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from common.models import Filter, Workload
from controller.jobs import JobLifecycle
from controller.workers import TRUSTED_AT_FIRST, WorkerInfo, WorkerState
from plane import wire
from plane.rpc import RpcError
from scheduler.dispatcher import Dispatcher, SchedulerSettings
from storage.sqlite import SqliteDatastore


@dataclass
class StubWorker:
    """A worker whose jobs wait until the test answers them (``finish`` or ``fail``)."""

    name: str
    capacity: int = 2
    tags: tuple[str, ...] = ()
    cpu_percent: float = 10.0
    trusted: bool = True  # False: a newcomer whose claimed capacity is not yet proven
    received: list[wire.RunJob] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    _answers: dict[int, asyncio.Future] = field(default_factory=dict)

    def finish(self, job_id: int) -> None:
        self._answer(job_id, "ok")

    def fail(self, job_id: int, error: str = "boom", retryable: bool = True) -> None:
        self._answer(job_id, (error, retryable))

    def _answer(self, job_id: int, how: object) -> None:
        future = self._answers.setdefault(job_id, asyncio.get_running_loop().create_future())
        if not future.done():
            future.set_result(how)

    def job_ids(self) -> list[int]:
        return [m.job_id for m in self.received]


class StubMembership:
    """The scheduler's port to the workers (:class:`scheduler.ports.Members`), for stub workers."""

    def __init__(self, jobs: JobLifecycle) -> None:
        self.jobs = jobs
        self.workers: dict[str, WorkerInfo] = {}
        self.stubs: dict[str, StubWorker] = {}
        self._on_change: list[Callable[[], None]] = []
        self._on_lost: list[Callable[[str], None]] = []

    def subscribe(self, on_change: Callable[[], None], on_lost: Callable[[str], None]) -> None:
        self._on_change.append(on_change)
        self._on_lost.append(on_lost)

    def unsubscribe(self, on_change: Callable[[], None], on_lost: Callable[[str], None]) -> None:
        self._on_change.remove(on_change)
        self._on_lost.remove(on_lost)

    def add(self, stub: StubWorker) -> StubWorker:
        self.stubs[stub.name] = stub
        self.workers[stub.name] = WorkerInfo(
            stub.name, list(stub.tags), state=WorkerState.ALIVE, capacity=stub.capacity,
            cpu_percent=stub.cpu_percent, rpc_address=f"stub://{stub.name}", channel=object(),  # type: ignore[arg-type]
            trust=stub.capacity if stub.trusted else TRUSTED_AT_FIRST)
        for cb in self._on_change:
            cb()
        return stub

    def credit(self, name: str) -> None:
        """A result of ``name``'s was stored: toward more trusted slots, as membership does."""
        info = self.workers.get(name)
        if info is not None:
            info.credit()

    def kill(self, name: str) -> None:
        info = self.workers[name]
        info.state = WorkerState.GONE
        info.channel = None
        for future in self.stubs[name]._answers.values():
            if not future.done():
                future.set_result("dead")
        for cb in self._on_lost:
            cb(name)

    def snapshot(self) -> list[WorkerInfo]:
        return list(self.workers.values())

    def member(self, name: str) -> WorkerInfo | None:
        return self.workers.get(name)

    @property
    def capabilities(self) -> "StubMembership":
        return self  # (issues stub capabilities itself)

    def issue(self, name: str, *args: object) -> str:
        return f"stub-capability-for-{name}"

    async def call(self, name: str, msg: wire.Message, timeout: float) -> wire.Message:
        stub = self.stubs[name]
        if not self.workers[name].alive:
            raise RpcError(f"{name} is not a member")
        if isinstance(msg, wire.CancelJob):
            stub.cancelled.append(msg.job_id)
            stub._answer(msg.job_id, "cancelled")
            return wire.Ack()
        assert isinstance(msg, wire.RunJob)
        stub.received.append(msg)
        future = stub._answers.setdefault(msg.job_id, asyncio.get_running_loop().create_future())
        try:
            how = await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError as e:
            raise RpcError(f"run_job to {name}: no reply within {timeout:.1f}s") from e
        stub._answers.pop(msg.job_id, None)  # a later attempt on this worker waits again
        if how == "dead":
            raise RpcError(f"{name} died")
        if how == "cancelled":
            return wire.JobResult(msg.job_id, ok=False, error="cancelled", worker=name)
        if how == "ok":  # what the upload handler does when the worker stores the result
            await self.jobs.complete(msg.workload_id, msg.image_id, "PNG", 10)
            return wire.JobResult(msg.job_id, ok=True, worker=name, started=True)
        error, retryable = how  # type: ignore[misc]
        return wire.JobResult(msg.job_id, ok=False, error=error, retryable=retryable, worker=name, started=True)


class Fleet:
    """A scheduler over stub workers; ``submit`` stores and queues images like an upload."""

    def __init__(self, store: SqliteDatastore, settings: SchedulerSettings) -> None:
        self.store = store
        self.jobs = JobLifecycle(store)
        self.membership = StubMembership(self.jobs)
        self.scheduler = Dispatcher(self.jobs, self.membership, settings)

    async def workload(self, name: str, tags: tuple[str, ...] = ()) -> Workload:
        return await self.store.create_workload(name, "alice", Filter.GRAYSCALE, tags)

    async def submit(self, workload: Workload, n: int, first: int = 0) -> None:
        for i in range(first, first + n):
            self.scheduler.submit(await self.jobs.enqueue(workload, i, "PNG", 10))

    async def states(self, workload: Workload) -> dict[int, tuple[str, int]]:
        return {j["image_id"]: (j["state"], j["attempts"]) for j in await self.store.job_timings(workload.id)}
