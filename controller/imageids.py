"""Ids of a workload's originals: 0, 1, 2... in arrival order, or the one the client chose (the
CLI numbers a video's frames itself). Two ways to take them, chosen once by the datastore:

- :class:`LocalImageIds` (one server on its datastore): in memory, no lock held over an upload's
  I/O, seeded by the datastore's counter, which each recorded original advances; after a crash
  an id taken but not recorded is taken again by the next upload.
- :class:`SharedImageIds` (servers sharing a datastore): the datastore's counter itself, taken
  in one statement.

An upload that fails gives its id back (no gap for a client that sends one image at a time).
"""

from __future__ import annotations

import abc
import asyncio

from common.models import Conflict, ImageType, NotFound, quoted
from storage.datastore import Datastore
from storage.sql import Script, q


class ImageIds(abc.ABC):
    """What both ways share: ids chosen by clients, checked against those being placed."""

    def __init__(self, store: Datastore) -> None:
        self.store = store
        self._locks: dict[str, asyncio.Lock] = {}
        self._taken: dict[str, set[int]] = {}  # workload -> ids of originals being placed now

    def _lock(self, workload_id: str) -> asyncio.Lock:
        return self._locks.setdefault(workload_id, asyncio.Lock())

    @abc.abstractmethod
    async def take(self, workload_id: str) -> int:
        """The workload's next id, for an original being placed."""

    async def choose(self, workload_id: str, chosen: int) -> int:
        """``chosen`` for an original being placed, unless it is taken (:class:`Conflict`)."""
        async with self._lock(workload_id):  # never with a seeding or another chosen id
            taken = self._taken.setdefault(workload_id, set())
            if chosen in taken or await self.store.has_image(workload_id, chosen, ImageType.ORIGINAL):
                raise Conflict(f"original image {chosen} of workload {quoted(workload_id)} already exists")
            taken.add(chosen)
            self._chosen(workload_id, chosen)
        return chosen

    def _chosen(self, workload_id: str, chosen: int) -> None:
        """A chosen id was taken (the next ones given follow it)."""

    def placed(self, workload_id: str, image_id: int) -> None:
        """The original of ``image_id`` is recorded, or its upload is over."""
        self._taken.get(workload_id, set()).discard(image_id)

    async def give_back(self, workload_id: str, image_id: int) -> None:
        """The upload that took ``image_id`` failed."""

    def cancelled(self, workload_id: str, image_id: int) -> None:
        """The upload that took ``image_id`` was cancelled (nothing may be awaited)."""

    def forget(self, workload_id: str) -> None:
        """The workload is gone."""
        for table in (self._locks, self._taken):
            table.pop(workload_id, None)


class LocalImageIds(ImageIds):
    def __init__(self, store: Datastore) -> None:
        super().__init__(store)
        self._next: dict[str, int] = {}  # workload -> its next id

    async def take(self, workload_id: str) -> int:
        if workload_id not in self._next:
            async with self._lock(workload_id):
                if workload_id not in self._next:
                    self._next[workload_id] = await self.store.next_image_id(workload_id)
        taken = self._taken.setdefault(workload_id, set())
        image_id = self._next[workload_id]
        while image_id in taken:  # a chosen id being placed, not yet counted
            image_id += 1
        self._next[workload_id] = image_id + 1
        taken.add(image_id)
        return image_id

    def _chosen(self, workload_id: str, chosen: int) -> None:
        if workload_id in self._next:
            self._next[workload_id] = max(self._next[workload_id], chosen + 1)

    async def give_back(self, workload_id: str, image_id: int) -> None:
        self.cancelled(workload_id, image_id)

    def cancelled(self, workload_id: str, image_id: int) -> None:
        if self._next.get(workload_id) == image_id + 1:
            self._next[workload_id] = image_id

    def forget(self, workload_id: str) -> None:
        super().forget(workload_id)
        self._next.pop(workload_id, None)


class SharedImageIds(ImageIds):
    def __init__(self, store: Datastore) -> None:
        super().__init__(store)
        self._background: set[asyncio.Future] = set()

    async def take(self, workload_id: str) -> int:
        return await self.store.write(_take_counter(workload_id), durable=False)

    async def give_back(self, workload_id: str, image_id: int) -> None:
        await self.store.write(_give_counter_back(workload_id, image_id), durable=False)

    def cancelled(self, workload_id: str, image_id: int) -> None:
        task = asyncio.ensure_future(self.give_back(workload_id, image_id))  # not awaited: being cancelled
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failure costs a gap only


def image_ids(store: Datastore) -> ImageIds:
    """The way ``store`` gives ids: in memory, or from its counters when servers share it."""
    return SharedImageIds(store) if store.shared else LocalImageIds(store)


def _take_counter(workload_id: str) -> Script[int]:
    taken = (yield q("UPDATE workloads SET next_image_id = next_image_id + 1 WHERE id = ?"
                     " RETURNING next_image_id - 1", workload_id)).scalar()
    if taken is None:
        raise NotFound(f"workload {quoted(workload_id)} not found")
    return taken


def _give_counter_back(workload_id: str, image_id: int) -> Script[None]:
    yield q("UPDATE workloads SET next_image_id = ? WHERE id = ? AND next_image_id = ?",
            image_id, workload_id, image_id + 1)
