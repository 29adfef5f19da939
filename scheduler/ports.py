"""What the scheduler needs from the rooms around it, declared: the workers (membership, or the
tests' fake fleet) and, for the carrier, the scheduler's slot keeping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from common.models import Job
from controller.workers import WorkerInfo
from plane import wire


class Issuer(Protocol):
    """Issues a job's HTTP capability (:class:`controller.capability.Capabilities`)."""

    def issue(self, name: str, job_id: int, workload_id: str, image_id: int, filter_: str,
              deadline: float) -> str: ...


class Members(Protocol):
    """The workers: who they are and how they are called (:class:`controller.membership.Membership`)."""

    def snapshot(self) -> list[WorkerInfo]: ...
    def member(self, name: str) -> WorkerInfo | None: ...
    async def call(self, name: str, msg: wire.Message, timeout: float) -> wire.Message: ...
    @property
    def capabilities(self) -> Issuer: ...
    def credit(self, name: str) -> None: ...
    def subscribe(self, on_change: Callable[[], None], on_lost: Callable[[str], None]) -> None: ...
    def unsubscribe(self, on_change: Callable[[], None], on_lost: Callable[[str], None]) -> None: ...


class Slots(Protocol):
    """What the carrier needs from the scheduler: slot keeping and task tracking."""

    def reserve_second(self, job: Job, primary: str) -> str | None: ...
    def queued(self) -> int: ...
    def release(self, worker: str, job: Job) -> None: ...
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task: ...
