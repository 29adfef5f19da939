"""The workloads service: what a user does with workloads as wholes (create, delete, the quota
their images take) and what retention does with old ones, in one place for the API and the
server's own loops. Handlers parse and answer; the steps are here.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from common.models import (
    BadInput,
    Filter,
    NotFound,
    Workload,
    check_workload_name,
    quoted,
)
from controller.jobs import JobLifecycle
from storage.jobrows import quota_exceeded
from plane import wire
from storage.datastore import Datastore

logger = logging.getLogger(__name__)

#: Workloads kept in memory at most (their rows: a few hundred bytes each).
MAX_KNOWN = 4096
#: Seconds a cached workload is trusted when servers share the datastore.
KNOWN_SHARED = 2.0


def checked_tags(raw: str) -> tuple[str, ...]:
    """The tags a workload's workers must have: as many as a worker may have at most, each a
    name like a worker's (a tag no worker can carry would keep the workload waiting forever)."""
    tags = sorted({t.strip() for t in raw.split(",") if t.strip()})
    if len(tags) > wire.MAX_TAGS:
        raise BadInput(f"at most {wire.MAX_TAGS} tags, got {len(tags)}")
    for tag in tags:
        if not wire.NAME_RE.fullmatch(tag):
            raise BadInput(f"a tag is 1-64 letters, digits, '.', '_' or '-' (got {quoted(tag)})")
    return tuple(tags)


class Workloads:
    """Workloads of users: made, removed for good (by their owner or by retention), and the
    bytes their images take against a quota."""

    def __init__(self, store: Datastore, jobs: JobLifecycle, quota_bytes: int = 0,
                 drop_jobs: Callable[[str], int] = lambda workload_id: 0) -> None:
        """``drop_jobs(workload_id)``: the scheduler forgets the workload's queued jobs and
        cancels its running ones (how many it touched)."""
        self.store = store
        self.jobs = jobs
        self.quota_bytes = quota_bytes
        self.drop_jobs = drop_jobs
        self._known: OrderedDict[str, tuple[Workload, float]] = OrderedDict()  # id -> (workload, when read)
        # Another server may delete a workload this one has cached: kept only a moment then
        # (a late upload is still refused by its row, which is gone); alone, until deleted here.
        self._known_for = KNOWN_SHARED if store.shared else float("inf")

    async def get(self, workload_id: str, owner: str | None = None) -> Workload:
        """The workload (:class:`NotFound` if it is not ``owner``'s), from memory when it was
        read lately: workloads never change, so every upload need not read its row again."""
        now = time.monotonic()
        known = self._known.get(workload_id)
        if known is None or now - known[1] > self._known_for:
            workload = await self.store.get_workload(workload_id)
            self._known[workload_id] = known = (workload, now)
            while len(self._known) > MAX_KNOWN:
                self._known.popitem(last=False)
        workload = known[0]
        if owner is not None and workload.owner != owner:
            raise NotFound(f"workload {quoted(workload_id)} not found")
        return workload

    def forget(self, workload_id: str) -> None:
        self._known.pop(workload_id, None)

    async def create(self, owner: str, filter_: Filter, name: str | None = None, tags: str = "",
                     meta: dict | None = None, params: dict | None = None) -> Workload:
        """A new workload of ``owner``'s (a generated name if none), its filter's parameters
        validated already; nothing is made if anything is wrong."""
        if name is not None:
            check_workload_name(name)
        return await self.store.create_workload(name, owner, filter_, checked_tags(tags), meta, params)

    async def delete(self, workload_id: str, owner: str | None) -> dict:
        """Remove the workload for good: nothing new of it starts, running copies are cancelled,
        its rows go in one transaction, then its images (thumbnails too). What was removed;
        :class:`NotFound` if it is not ``owner``'s (or gone)."""
        workload = await self.store.get_workload(workload_id, owner)
        self.forget(workload.id)
        cancelled = self.drop_jobs(workload.id)
        removed = await self.jobs.delete_workload(workload)
        if removed is None:
            raise NotFound(f"workload {quoted(workload.id)} not found")
        removed.pop("dir", None)
        return {**removed, "jobs_cancelled": cancelled}

    async def remove_expired(self, before: float, days: float) -> int:
        """Remove the completed workloads created before ``before`` (a log line each); how
        many."""
        removed = 0
        while batch := await self.store.expired_workloads(before):
            for workload_id, owner in batch:
                try:
                    gone = await self.delete(workload_id, None)
                except NotFound:
                    continue
                removed += 1
                logger.info("retention: removed workload %s (%s) of %s, completed and older than %g days:"
                            " %d images, %d results, %d bytes", workload_id, gone["workload_name"], owner, days,
                            gone["images"], gone["filtered_images"], gone["bytes"])
        return removed

    async def quota_allows(self, owner: str, size: int) -> None:
        """A first look, before an upload is placed: its owner's images and this one must fit
        the quota (the reservation itself is made with the image's row: :meth:`JobLifecycle.enqueue`)."""
        if not self.quota_bytes:
            return
        used = await self.store.bytes_of(owner)
        if used + size > self.quota_bytes:
            raise quota_exceeded(used, self.quota_bytes, size)
