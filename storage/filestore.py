"""The default image store: files under ``<data-dir>/images/``, each written to a temporary file
under ``<data-dir>/incoming/``, synced, then renamed into place, so that a file at its final name
is always complete (a small one judged in memory and written, synced and placed in one trip to a
thread)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from common.budget import ByteBudget
from common.models import BadInput, NotFound
from imaging import facts
from imaging.formats import sniff_format
from storage import files
from storage.groupwrite import FileWrite, GroupWriter

logger = logging.getLogger(__name__)

#: Beside the directory of uploads being received (``incoming.results-synced``): the time before
#: which every result written unsynced is on disk.
SYNCED_STAMP = ".results-synced"
from storage.images import (_FLUSH_BYTES, KEEP_BYTES, READ_BUDGET, SMALL_DOWNLOAD, Download, ImageStore,
                            ReceivedImage)
class FileImageStore(ImageStore):
    """Images as files under ``root`` (``<data-dir>/images``), uploads staged in ``incoming``."""

    def __init__(self, root: Path, incoming: Path, max_bytes: int, max_pixels: int, fsync: bool = True) -> None:
        super().__init__(max_bytes, max_pixels)
        self.root = root
        self.incoming = incoming
        self.fsync = fsync
        self._committed: set[Path] = set()  # temp files commit() took: discard() has nothing to do
        self._dir_sync = files.DirSync()
        self._reading = ByteBudget(READ_BUDGET)  # downloads read into memory
        self._writer = GroupWriter(incoming, on_synced=self._synced)  # images in memory, in groups
        self._stamp = incoming.with_name(incoming.name + SYNCED_STAMP)
        #: results recorded from this time on may have been lost with a crash (see results_unsure)
        self.unsure_since: float | None = None

    async def open(self) -> None:
        try:
            self.unsure_since = float(self._stamp.read_text())
        except (OSError, ValueError):
            self.unsure_since = None  # never written unsynced (or a data dir of an earlier version)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._writer.close)
        await super().close()

    def intact(self, key: str, size: int) -> bool:
        try:
            return self.path(key).stat().st_size == size
        except OSError:
            return False

    def _synced(self, before: float) -> None:
        """In the writer thread: every result written before ``before`` is on disk; say so
        (durably) for the next start."""
        tmp = self._stamp.with_name(self._stamp.name + ".tmp")
        try:
            files.write_replacing_synced(tmp, self._stamp, repr(before).encode())
        except OSError as e:
            logger.warning("could not record that results are on disk (%s): the next start checks more of them", e)

    def path(self, key: str) -> Path:
        return self.root / key

    def _fsync(self) -> bool:
        return self.fsync

    async def receive(self, chunks: AsyncIterator[bytes]) -> ReceivedImage:
        """Stream ``chunks`` into a file under ``incoming`` and validate it.

        Bytes are buffered up to 1 MiB between writes, so a large image costs a few trips to
        the executor instead of one per network chunk; a small one (up to KEEP_BYTES) is judged
        in memory and costs none until :meth:`commit`.
        """
        loop = asyncio.get_running_loop()
        tmp = self.incoming / f"{uuid.uuid4().hex}.upload"
        writer = files.TmpWriter(tmp)
        buffered: list[bytes] = []
        pending = size = 0
        try:
            async for chunk in self._checked(chunks):
                size += len(chunk)
                buffered.append(chunk)
                pending += len(chunk)
                if pending >= _FLUSH_BYTES:
                    await loop.run_in_executor(None, writer.write_checked, buffered)
                    buffered, pending = [], 0
            if size == 0:
                raise BadInput("the uploaded file is empty")
            if size <= KEEP_BYTES:  # never flushed, all here: judged in memory, and written,
                # synced and placed by commit() in one trip to a thread
                return await self.receive_bytes(b"".join(buffered))
            fmt, head = await loop.run_in_executor(None, self._finish, writer, buffered)
            self._check_pixels(head.width, head.height)
        except BaseException:
            writer.close(quiet=True)
            tmp.unlink(missing_ok=True)
            raise
        return ReceivedImage(tmp, fmt, size, head.width, head.height, head.mode, None, head.photo, frames=head.frames)

    def _finish(self, writer: files.TmpWriter, rest: list[bytes]) -> tuple[str, facts.Header]:
        """Write the rest, flush to disk, then read the header (only): format and size."""
        with files.no_space_left("the image"):
            writer.write(rest)
            writer.close(fsync=self.fsync)
        with open(writer.path, "rb") as g:
            fmt = sniff_format(g.read(16))
        if fmt is None:
            raise BadInput("the uploaded file is not an image (unknown format)")
        head = facts.header_of(writer.path, fmt)
        if fmt == "JPEG":
            facts.check_scans(facts.jpeg_scans(facts.file_chunks(writer.path)), head.width, head.height,
                              self.max_pixels)
        return fmt, head

    async def commit(self, stored: ReceivedImage, key: str, replace: bool = True, keep: bool = False,
                     durable: bool = True) -> bool:
        loop = asyncio.get_running_loop()
        final = self.path(key)
        if stored.path is None:  # in memory: written, synced and placed with others (one thread)
            assert stored.data is not None
            placed = await self._writer.write(stored.data, final, replace, sync=self.fsync and durable)
        else:
            placed = await loop.run_in_executor(None, self._place, stored.path, final, replace)
            self._committed.add(stored.path)  # gone from incoming/ either way (placed, or dropped)
        if placed and keep and stored.data is not None:
            self._remember(key, stored.data)
        return placed

    def prepared(self, stored: ReceivedImage, key: str, replace: bool = True, keep: bool = False,
                 durable: bool = True) -> FileWrite | None:
        if stored.data is None:
            return None  # received into a file: moved into place by commit()
        write = self._writer.prepare(stored.data, self.path(key), replace, sync=self.fsync and durable)
        if keep:
            self._remember(key, stored.data)
        return write

    async def discard(self, stored: ReceivedImage) -> None:
        """Drop a received file that was not committed (nothing to do once it was moved into
        place, or if it was never written: no trip to the executor then)."""
        if stored.path is None:
            return
        if stored.path in self._committed:
            self._committed.discard(stored.path)
            return
        await asyncio.get_running_loop().run_in_executor(None, files.unlink, stored.path)

    async def download(self, key: str, content_type: str, whole: bool = False) -> Download:
        path = self.path(key)
        if whole and (recent := self._recent.get(key)) is not None:
            return Download(data=recent, size=len(recent))  # held for its job already
        if not whole or not self._reading.take(SMALL_DOWNLOAD):  # the most it may read, held
            return Download(path=path)  # before reading, so that concurrent reads count
        try:
            data = await asyncio.get_running_loop().run_in_executor(None, _read_small, path)
        except FileNotFoundError as e:
            self._reading.give(SMALL_DOWNLOAD)
            raise NotFound("image not found") from e
        except BaseException:
            self._reading.give(SMALL_DOWNLOAD)
            raise
        held = len(data) if data is not None else 0
        self._reading.give(SMALL_DOWNLOAD - held)  # it holds what it read until sent
        if data is None:  # larger: streamed from the file
            return Download(path=path)

        def release() -> None:
            self._reading.give(held)

        return Download(data=data, size=held, release=release)

    async def read(self, key: str) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(None, self.path(key).read_bytes)

    async def exists(self, key: str) -> bool:
        return self.path(key).exists()

    async def write(self, key: str, data: bytes) -> None:
        await asyncio.get_running_loop().run_in_executor(None, files.write_replacing, self.path(key), data)

    def _place(self, src: Path, dst: Path, replace: bool) -> bool:
        """In a thread: move ``src`` to ``dst`` (with ``replace=False`` an existing ``dst`` wins
        and ``src`` is dropped); the rename is on disk when this returns."""
        try:
            with files.no_space_left("the image"):
                dst.parent.mkdir(parents=True, exist_ok=True)
        except BaseException:
            src.unlink(missing_ok=True)
            raise
        if replace:
            os.replace(src, dst)
        else:
            try:
                os.link(src, dst)  # atomic "create if absent"
            except FileExistsError:
                src.unlink(missing_ok=True)
                return False
            src.unlink()
        if self.fsync:
            self._dir_sync.sync(dst.parent)
        return True

    async def remove(self, key: str) -> None:
        self.forget(key)
        await asyncio.get_running_loop().run_in_executor(None, files.unlink, self.path(key))

    async def remove_workload(self, workload_dir: str) -> int:
        self._forget_prefix(f"{workload_dir}/")
        return await asyncio.get_running_loop().run_in_executor(None, files.remove_tree, self.root / workload_dir)

    def space(self) -> tuple[int, int] | None:
        try:
            usage = shutil.disk_usage(self.root)
        except OSError:
            return None
        return usage.free, usage.total


def _read_small(path: Path) -> bytes | None:
    """In a thread: the file's bytes if it holds at most SMALL_DOWNLOAD, else None."""
    with open(path, "rb") as f:
        data = f.read(SMALL_DOWNLOAD + 1)
    return data if len(data) <= SMALL_DOWNLOAD else None
