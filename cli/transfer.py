"""Moving images and watching progress: ``dpip push``, ``pull`` and ``watch`` (video reuses them).

Uploads carry their own ``image_id`` (the position of the file in natural order, or the frame
number), so K parallel uploads keep the order and a re-run skips what the server already has.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from cli.client import Api
from cli.config import CliError
from common.formats import FORMATS

T = TypeVar("T")
IMAGE_SUFFIXES = {f".{ext}" for ext, _ in FORMATS.values()} | {".jpeg", ".tif"}
EXTENSIONS = {fmt: ext for fmt, (ext, _) in FORMATS.items()}

#: Progress and messages go to stderr; stdout carries only results (a workload id, a table).
err = Console(stderr=True, highlight=False, soft_wrap=True)


def progress_bar(quiet: bool = False) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
        console=err, disable=quiet, transient=False,
    )


def rate_text(count: int, started: float) -> str:
    elapsed = time.monotonic() - started
    return f"{count / elapsed:5.1f} img/s" if elapsed > 0 and count else "  -   img/s"


def natural_key(path: Path) -> list:
    """Sort key that puts ``2.png`` before ``10.png``."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", str(path))]


def collect(paths: Iterable[Path]) -> list[Path]:
    """The image files named or contained (one level deep) in ``paths``, in natural order."""
    files: set[Path] = set()
    for path in paths:
        if path.is_dir():
            files.update(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.add(path)
        else:
            raise CliError(f"{path}: no such file or directory")
    if not files:
        raise CliError(f"no image files in {', '.join(map(str, paths))}")
    return sorted(files, key=natural_key)


async def first_error(*aws: Awaitable[object]) -> None:
    """Run ``aws`` together; on the first failure cancel the rest and raise that failure
    (not an ExceptionGroup: the CLI reports one line)."""
    try:
        async with asyncio.TaskGroup() as group:
            for aw in aws:
                group.create_task(aw)  # type: ignore[arg-type]
    except BaseExceptionGroup as eg:
        raise _leaf(eg) from None


def _leaf(eg: BaseExceptionGroup) -> BaseException:
    first = eg.exceptions[0]
    return _leaf(first) if isinstance(first, BaseExceptionGroup) else first


@dataclass
class Upload:
    image_id: int
    filename: str
    load: Callable[[], bytes]  # runs in a thread: reads a file or encodes a frame


@dataclass
class PushResult:
    sent: int = 0
    skipped: int = 0  # the server had them already (a resumed push)
    bytes: int = 0


async def upload_all(api: Api, workload_id: str, uploads: AsyncIterator[Upload], jobs: int,
                     progress: Progress, total: int | None, existing: dict[int, int] | None = None) -> PushResult:
    """Upload ``uploads`` ``jobs`` at a time, as they come (a video is decoded meanwhile).
    ``existing``: sizes of the originals the workload has (a resumed push); an image of the same
    size under the same id is taken as sent, another size is an error."""
    existing = existing or {}
    loop = asyncio.get_running_loop()
    result = PushResult()
    started = time.monotonic()
    task = progress.add_task("push", total=total, rate="")
    queue: asyncio.Queue[Upload | None] = asyncio.Queue(maxsize=2 * jobs)

    async def produce() -> None:
        async for upload in uploads:
            await queue.put(upload)
        for _ in range(jobs):
            await queue.put(None)

    async def send() -> None:
        while (upload := await queue.get()) is not None:
            data = await loop.run_in_executor(None, upload.load)
            there = existing.get(upload.image_id)
            if there is not None and there != len(data):
                raise CliError(f"image {upload.image_id} of workload {workload_id} already exists with other"
                               f" content ({there} bytes, {upload.filename} has {len(data)}): push into a new workload")
            if there is None and await api.upload(workload_id, upload.image_id, upload.filename, data):
                result.sent += 1
                result.bytes += len(data)
            else:
                result.skipped += 1
            done = result.sent + result.skipped
            progress.update(task, completed=done, rate=rate_text(done, started))

    await first_error(produce(), *(send() for _ in range(jobs)))
    progress.update(task, total=result.sent + result.skipped)
    return result


async def files_as_uploads(files: list[Path]) -> AsyncIterator[Upload]:
    for image_id, path in enumerate(files):
        yield Upload(image_id, path.name, path.read_bytes)


def file_name(entry: dict) -> str:
    return f"{entry['image_id']}.{EXTENSIONS.get(entry.get('format', 'PNG'), 'png')}"


async def pull(api: Api, workload_id: str, out_dir: Path, type_: str, jobs: int,
               progress: Progress) -> tuple[int, int]:
    """Download the workload's images of ``type_`` into ``out_dir`` as ``<id>.<ext>``; files
    already there with the right size are kept. Returns (downloaded, skipped)."""
    entries = await api.list_images(workload_id, type_)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [e for e in entries if not _complete(out_dir / file_name(e), e.get("size"))]
    task = progress.add_task("pull", total=len(todo), rate="")
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    done = 0

    async def fetch(entry: dict) -> None:
        nonlocal done
        data = await api.download(workload_id, entry["image_id"], type_)
        if entry.get("size") is not None and len(data) != entry["size"]:
            raise CliError(f"image {entry['image_id']}: got {len(data)} bytes, expected {entry['size']}")
        await loop.run_in_executor(None, _write_atomically, out_dir / file_name(entry), data)
        done += 1
        progress.update(task, completed=done, rate=rate_text(done, started))

    await bounded(map(fetch, todo), jobs)
    return len(todo), len(entries) - len(todo)


async def bounded(aws: Iterable[Awaitable[T]], limit: int) -> None:
    """Await ``aws`` at most ``limit`` at a time, stopping at the first failure."""
    it = iter(aws)

    async def lane() -> None:
        for aw in it:  # the lanes share one iterator
            await aw

    await first_error(*(lane() for _ in range(limit)))


async def in_order(ids: AsyncIterator[int], fetch: Callable[[int], Awaitable[T]], window: int) -> AsyncIterator[T]:
    """Fetch ``ids`` as they come, up to ``window`` at a time, and yield the results in order
    (video frames: downloads overlap, the encoder sees frame k before k+1)."""
    pending: asyncio.Queue[asyncio.Future[T] | None] = asyncio.Queue(maxsize=window)

    async def produce() -> None:
        try:
            async for i in ids:
                await pending.put(asyncio.ensure_future(fetch(i)))
        finally:
            await pending.put(None)

    producer = asyncio.ensure_future(produce())
    try:
        while (next_fetch := await pending.get()) is not None:
            yield await next_fetch
        await producer  # raises what stopped the ids, if anything did
    finally:
        producer.cancel()
        while not pending.empty():
            if (left := pending.get_nowait()) is not None:
                left.cancel()


def _complete(path: Path, size: int | None) -> bool:
    try:
        return size is not None and path.stat().st_size == size
    except FileNotFoundError:
        return False


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class Progressed:
    """What ``watch`` saw last."""

    workload: dict
    elapsed: float


async def watch(api: Api, workload_id: str, progress: Progress, interval: float = 1.0) -> Progressed:
    """Poll the workload until it is completed, showing done, failed, running, rate and ETA."""
    started = time.monotonic()
    first_done: int | None = None
    task = progress.add_task("", total=None, rate="")
    while True:
        w = await api.workload(workload_id)
        done, failed = len(w["filtered_images"]), len(w.get("failed_images", []))
        first_done = done + failed if first_done is None else first_done
        finished = done + failed - first_done  # the rate counts what happened while we watched
        desc = f"{w['workload_name']} {w['status']:<10} running {w['running_jobs']:>3} failed {failed:>3}"
        progress.update(task, description=desc, total=w.get("images") or None,
                        completed=done + failed, rate=rate_text(finished, started))
        if w["status"] == "completed":
            return Progressed(w, time.monotonic() - started)
        await asyncio.sleep(interval)
