"""Image files written safely, for the file store (and the thumbnails it keeps): temporary
files synced before they are renamed into place, renames into one directory sharing its fsync,
a full disk reported as the 507 it is, and a result's metadata dropped in place.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from common.models import InsufficientStorage
from imaging import metadata


class TmpWriter:
    """A temporary file opened lazily, written in batches from the executor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: BinaryIO | None = None

    def write(self, chunks: list[bytes]) -> None:
        if self._f is None:  # 0600 whatever the umask: it becomes the stored image as it is
            self._f = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        self._f.writelines(chunks)

    def write_checked(self, chunks: list[bytes]) -> None:
        with no_space_left("the image"):
            self.write(chunks)

    def close(self, fsync: bool = False, quiet: bool = False) -> None:
        """Flush and close (``quiet``: after a failure, whatever the close says)."""
        if self._f is None:
            return
        f, self._f = self._f, None
        try:
            if fsync:
                f.flush()
                os.fsync(f.fileno())
            f.close()
        except OSError:
            if not quiet:
                raise

class DirSync:
    """fsyncs of directories, shared. A rename is on disk once an fsync of its directory that
    began after it has ended; so renames into one directory that wait at the same time share
    one fsync (uploads pouring into a workload: one or two fsyncs where there were eight)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dirs: dict[Path, _DirState] = {}

    def sync(self, directory: Path) -> None:
        """Return once every rename into ``directory`` made before this call is on disk."""
        with self._lock:
            state = self._dirs.get(directory)
            if state is None:
                state = self._dirs[directory] = _DirState()
            state.requested += 1
            state.users += 1
            mine = state.requested
        try:
            with state.syncing:
                if state.synced >= mine:
                    return  # an fsync that began after our rename has ended meanwhile
                with self._lock:
                    upto = state.requested  # every one of these renamed before the fsync begins
                fd = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                state.synced = upto
        finally:
            with self._lock:
                state.users -= 1
                if state.users == 0:
                    del self._dirs[directory]

@dataclass
class _DirState:
    requested: int = 0  # renames that asked for an fsync
    synced: int = 0  # of those, the first this many are on disk
    users: int = 0  # threads inside sync() for this directory
    syncing: threading.Lock = field(default_factory=threading.Lock)

def write_replacing_synced(tmp: Path, path: Path, data: bytes) -> None:
    """``data`` at ``path``, whole or not at all, on disk when this returns (a small file)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_replacing(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")  # two first requests may race
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def remove_tree(path: Path) -> int:
    """In a thread: every file under ``path``; how many there were."""
    count = sum(1 for p in path.rglob("*") if p.is_file()) if path.exists() else 0
    shutil.rmtree(path, ignore_errors=True)
    return count

def unlink(path: Path) -> None:
    path.unlink(missing_ok=True)

@contextlib.contextmanager
def no_space_left(what: str) -> Iterator[None]:
    """A full disk (or quota) is InsufficientStorage (507), not an error of ours."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage(f"no space left on the server's disk for {what}: free some space"
                                      " (e.g. delete a workload) and try again") from e
        raise

def strip_file(path: Path, fmt: str, fsync: bool) -> int | None:
    """In a thread: drop the metadata of the (temporary) file at ``path`` in place; its new
    size, or None if it had none (then nothing is written: an honest result costs a walk of
    its chunk headers through a memory map)."""
    with open(path, "rb") as f:
        with contextlib.closing(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) as view:
            ranges = metadata.keep_ranges(view, fmt)
            if ranges is None:
                return None
            clean = metadata.join(view, ranges, fmt)
    tmp = path.with_name(path.name + ".clean")
    writer = TmpWriter(tmp)
    try:
        with no_space_left("the image"):
            writer.write([clean])
            writer.close(fsync=fsync)
        os.replace(tmp, path)
    except BaseException:
        writer.close(quiet=True)
        tmp.unlink(missing_ok=True)
        raise
    return len(clean)
