"""What the HTTP layer needs from the scheduler and the autoscaler, and no more: the API
depends on these small interfaces, never on the scheduler's modules (the composition root,
:mod:`server.services`, plugs the real ones in)."""

from __future__ import annotations

from typing import Protocol

from controller.models import Job


class SchedulerPort(Protocol):
    #: workload id -> why its next job is not placed yet
    waiting: dict[str, str]

    def submit(self, job: Job) -> None: ...
    def drop_workload(self, workload_id: str) -> int: ...
    def queued(self) -> int: ...
    def describe(self) -> dict: ...
    async def leader_name(self) -> str | None: ...


class AutoscalerPort(Protocol):
    def describe(self) -> dict: ...
    def is_managed(self, name: str) -> bool: ...
