"""Image files written in groups by one thread: durable without a thread trip per file.

The event loop queues a file (its bytes and where it goes) and awaits it; one writer thread
takes whatever is queued when it wakes (no timer: a group is what piled up while the last one
was being written, so an idle system writes each file at once and a busy one in groups), writes
and syncs each file, renames each into place, syncs each directory once for the whole group,
and wakes the loop once for all of them. Haystack's grouped writes, in a few dozen lines: the
per-file cost left is the file's own (open, write, fsync, close; no temporary name, no rename:
nobody reads a file before its row, which is committed after it).
Written here rather than taken from a library: aiofiles and anyio run each call on a thread
pool, a trip per call, which is exactly the cost this removes.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import time
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.models import InsufficientStorage

#: Files written in one group at most (the rest wait for the next).
MAX_GROUP = 256
#: The most one write(2) is given: measured on these machines, a 1.4 MB frame written in one
#: call costs 2.3-4.2 ms of kernel CPU, in 256 KiB pieces 0.8 ms (the same bytes, the same file).
WRITE_PIECE = 256 * 1024
#: Files written unsynced are made durable (the whole filesystem synced) within this many seconds.
SYNC_EVERY = 1.0


def _syncfs() -> Callable[[int], None]:
    """``syncfs(2)`` of the filesystem an open file is on (Linux), else a sync of everything."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return lambda fd: os.sync()

    def call(fd: int) -> None:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    return call


@dataclass
class FileWrite:
    """A file to write from memory: through :meth:`GroupWriter.write`, or by the datastore's
    own writing thread just before the transaction that records it
    (:meth:`GroupWriter.write_now`: the file and its row in one trip)."""

    writer: GroupWriter
    data: bytes
    final: Path
    replace: bool  # False: an existing file wins (first result wins), and this one is dropped
    sync: bool
    future: asyncio.Future[bool] | None = None
    placed: bool = False  # once written: False if ``replace`` was off and a file was there first


class GroupWriter:
    """One writer thread for a store's files (see the module's docstring)."""

    def __init__(self, incoming: Path, name: str = "file-writer",
                 on_synced: Callable[[float], None] | None = None) -> None:
        """``on_synced(t)`` (in the writer thread): every file written unsynced before time
        ``t`` (time.time()) is on disk now."""
        self.incoming = incoming
        self.on_synced = on_synced
        self._unsynced_since: float | None = None  # the first unsynced write not yet made durable
        self._syncfs = _syncfs()
        self.name = name
        self._queue: list[FileWrite] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.groups = 0
        self.files = 0
        #: held while files are written (by this writer's thread or another's: write_now) and
        #: while the filesystem is synced, so that a sync never claims a file half written
        self._writing = threading.Lock()

    async def write(self, data: bytes, final: Path, replace: bool = True, sync: bool = True) -> bool:
        """Put ``data`` at ``final`` (synced, with its directory, if ``sync``): True once it is
        there, False if ``replace`` is off and a file was there first. InsufficientStorage on a
        full disk, leaving nothing behind."""
        f = self.prepare(data, final, replace, sync)
        f.future = asyncio.get_running_loop().create_future()
        with self._lock:
            self._queue.append(f)
        self._wake.set()
        return await f.future

    def prepare(self, data: bytes, final: Path, replace: bool = True, sync: bool = True) -> FileWrite:
        """A write for :meth:`write_now` in another thread (this writer still makes the unsynced
        ones durable within :data:`SYNC_EVERY`: its thread is started here, on the loop)."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        if self._closed:
            raise RuntimeError("the file writer is closed")
        return FileWrite(self, data, final, replace, sync)

    def write_now(self, group: list[FileWrite]) -> list[bool | BaseException]:
        """In the calling thread (another store's writing thread): ``group`` written as
        :meth:`write` would (each synced file's directory synced once), each file's outcome."""
        outcomes = self._write_group(group)
        for f, outcome in zip(group, outcomes, strict=True):
            f.placed = outcome is True
        return outcomes

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sync()

    def sync(self) -> None:
        """Make every file written so far durable (in the writer thread, or once it is gone)."""
        with self._writing:  # (no file half written by another thread meanwhile: write_now)
            began = time.time()
            if self._unsynced_since is None:
                return
            try:
                fd = os.open(self.incoming, os.O_RDONLY)
                try:
                    self._syncfs(fd)
                finally:
                    os.close(fd)
            except OSError:
                return  # tried again a second later; until then they are not claimed durable
            self._unsynced_since = None
        if self.on_synced is not None:
            self.on_synced(began)

    def _run(self) -> None:
        while True:
            due = None if self._unsynced_since is None else max(0.0, self._unsynced_since + SYNC_EVERY - time.time())
            if not self._wake.wait(due):
                self.sync()  # nothing new for a while: the unsynced files go to disk now
                continue
            with self._lock:
                group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
                if not self._queue:
                    self._wake.clear()
            if not group:
                if self._closed:
                    return
                continue
            if self._unsynced_since is not None and time.time() - self._unsynced_since > SYNC_EVERY:
                self.sync()  # (a steady stream: never more than a second behind)
            outcomes = self._write_group(group)
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(_settle, group, outcomes)
            except RuntimeError:
                return  # the loop is closed: nobody is waiting any more

    def _write_group(self, group: list[FileWrite]) -> list[bool | BaseException]:
        with self._writing:
            return self._write_group_held(group)

    def _write_group_held(self, group: list[FileWrite]) -> list[bool | BaseException]:
        self.groups += 1
        self.files += len(group)
        outcomes: list[bool | BaseException] = []
        synced: set[Path] = set()
        for f in group:
            try:
                if not f.sync and self._unsynced_since is None:
                    self._unsynced_since = time.time()
                    if threading.current_thread() is not self._thread:
                        self._wake.set()  # the writer's thread: a sync due within SYNC_EVERY
                placed = self._write_one(f)
                if placed and f.sync:
                    synced.add(f.final.parent)
                outcomes.append(placed)
            except BaseException as e:
                outcomes.append(_as_storage_error(e))
        for directory in synced:
            try:
                fd = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:  # the files are there, but their names may not survive a crash
                error = _as_storage_error(e)
                outcomes = [error if f.final.parent == directory and o is True else o
                            for f, o in zip(group, outcomes, strict=True)]
        return outcomes

    def _write_one(self, f: FileWrite) -> bool:
        """Straight to its final name (nobody reads it before its row, committed after this):
        created if absent (``replace`` off: an existing file wins) or truncated. A failure
        leaves nothing behind."""
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if f.replace else os.O_EXCL)
        try:
            try:
                fd = os.open(f.final, flags, 0o600)
            except FileNotFoundError:  # a new directory (or one removed meanwhile: a deleted workload)
                f.final.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(f.final, flags, 0o600)
        except FileExistsError:
            return False
        try:
            view = memoryview(f.data)
            while view:
                view = view[os.write(fd, view[:WRITE_PIECE]):]
            if f.sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            f.final.unlink(missing_ok=True)
            raise
        os.close(fd)
        return True


def _as_storage_error(e: BaseException) -> BaseException:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage("no space left on the server's disk for the image")
    return e


def _settle(group: list[FileWrite], outcomes: list[bool | BaseException]) -> None:
    for f, outcome in zip(group, outcomes, strict=True):
        assert f.future is not None
        if f.future.done():
            continue
        if isinstance(outcome, BaseException):
            f.future.set_exception(outcome)
        else:
            f.future.set_result(outcome)
