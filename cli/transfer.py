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

from cli import names as naming
from cli import pushes
from cli.client import Api, ApiError
from cli.session import CliError
from imaging.formats import FORMATS

T = TypeVar("T")
IMAGE_SUFFIXES = {f".{ext}" for ext, _ in FORMATS.values()} | {".jpeg", ".tif"}

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
                     progress: Progress, total: int | None, existing: dict[int, int] | None = None,
                     result: PushResult | None = None) -> PushResult:
    """Upload ``uploads`` ``jobs`` at a time, as they come (a video is decoded meanwhile).
    ``existing``: sizes of the originals the workload has (a resumed push); an image of the same
    size under the same id is taken as sent, another size is an error. ``result`` counts as it
    goes (the caller reads it when the push is interrupted)."""
    existing = existing or {}
    loop = asyncio.get_running_loop()
    result = result if result is not None else PushResult()
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
            if there is None and await _upload(api, workload_id, upload, data):
                result.sent += 1
                result.bytes += len(data)
            else:
                result.skipped += 1
            done = result.sent + result.skipped
            progress.update(task, completed=done, rate=rate_text(done, started))

    await first_error(produce(), *(send() for _ in range(jobs)))
    progress.update(task, total=result.sent + result.skipped)
    return result


async def _upload(api: Api, workload_id: str, upload: Upload, data: bytes) -> bool:
    try:
        return await api.upload(workload_id, upload.image_id, upload.filename, data)
    except ApiError as e:  # say which file: the server only knows it by its id
        raise ApiError(f"{upload.filename} (image {upload.image_id}): {e}", e.status) from e


async def files_as_uploads(files: list[Path]) -> AsyncIterator[Upload]:
    for image_id, path in enumerate(files):
        yield Upload(image_id, path.name, path.read_bytes)


async def pull(api: Api, workload_id: str, out_dir: Path, type_: str, jobs: int,
               progress: Progress, names: str = "id") -> tuple[int, int]:
    """Download the workload's images of ``type_`` into ``out_dir``, named as
    :func:`cli.names.local_names` says; files already there with the right size are kept.
    Returns (downloaded, skipped)."""
    entries = await api.list_images(workload_id, type_)
    originals = None
    if names == "original" and type_ != "original" and not all(e.get("filename") for e in entries):
        # a filtered image is named after its original, which the server may list only there
        originals = {e["image_id"]: e.get("filename") for e in await api.list_images(workload_id, "original")}
    local = naming.local_names(entries, names, originals)
    todo = [e for e in entries if not _complete(out_dir / local[e["image_id"]], e.get("size"))]
    if names == "original":
        _refuse_to_overwrite(out_dir, [local[e["image_id"]] for e in todo])
    out_dir.mkdir(parents=True, exist_ok=True)
    task = progress.add_task("pull", total=len(todo), rate="")
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    done = 0

    async def fetch(entry: dict) -> None:
        nonlocal done
        data = await api.download(workload_id, entry["image_id"], type_)
        if entry.get("size") is not None and len(data) != entry["size"]:
            raise CliError(f"image {entry['image_id']}: got {len(data)} bytes, expected {entry['size']}")
        await loop.run_in_executor(None, _write_atomically, out_dir / local[entry["image_id"]], data)
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


def _refuse_to_overwrite(out_dir: Path, todo: list[str]) -> None:
    """Uploaded names are the user's own (pulling into the folder pushed from is one slip away):
    a file of that name that is not this very image stays, and nothing is downloaded."""
    taken = [name for name in todo if (out_dir / name).exists()]
    if taken:
        more = f" and {len(taken) - 1} more files" if len(taken) > 1 else ""
        raise CliError(f"{out_dir / taken[0]}{more} already there with other content: not overwritten;"
                       " pull into another directory")


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
    idle: float = 0.0  # seconds since its image count last changed


async def watch(api: Api, workload_id: str, progress: Progress, interval: float = 1.0,
                stall: pushes.Stall | None = None) -> Progressed:
    """Poll the workload until it is completed, showing done, failed, running, rate and ETA. A
    workload short of the images its push announced is waited for until ``stall`` says that
    no more are coming (then ``pushes.missing`` of the result is non-zero)."""
    stall = stall or pushes.Stall()
    started = time.monotonic()
    first_done: int | None = None
    task = progress.add_task("", total=None, rate="")
    while True:
        w = await api.workload(workload_id)
        done, failed = len(w["filtered_images"]), len(w.get("failed_images", []))
        first_done = done + failed if first_done is None else first_done
        finished = done + failed - first_done  # the rate counts what happened while we watched
        ended = stall.done(w)
        state = pushes.status(w)
        if pushes.missing(w):  # the bar's total is what the push announced
            state = f"{state} ({pushes.uploaded(w)} uploaded)"
        desc = f"{w['workload_name']} {state:<10} running {w['running_jobs']:>3} failed {failed:>3}"
        progress.update(task, description=desc, total=pushes.expected(w) or w.get("images") or None,
                        completed=done + failed, rate=rate_text(finished, started))
        if ended:
            return Progressed(w, time.monotonic() - started, stall.idle())
        await asyncio.sleep(interval)
