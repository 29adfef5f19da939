"""The ``dpip`` commands, one function each; :mod:`cli.main` parses the line and reports failures.

A command is a coroutine function, or a plain function for the ones that must not run in the
event loop (the password prompt, the synthetic clip): :mod:`cli.main` runs either.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from fractions import Fraction
from pathlib import Path

from rich.progress import Progress

from cli import names, pushes, show, transfer
from cli import session as saved
from cli.client import RETRYABLE, Api, ApiError
from cli.session import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    CliError,
    Session,
)
from cli.transfer import PushResult, Upload, err, progress_bar

#: Where a new user finds the admin password (``make run`` prints it on the first start).
PASSWORD_HINT = "printed by make run, also in data/admin-password"


def _video():  # type: ignore[no-untyped-def]
    """:mod:`cli.video`, loaded by the video commands only (PyAV takes tens of ms to import, at
    every start of every other command otherwise)."""
    from cli import video
    return video


def _session(args: argparse.Namespace, need_token: bool = True) -> Session:
    session = saved.load()
    if getattr(args, "url", None):
        session = saved.at_url(session, args.url)
        session.token = os.environ.get("DPIP_TOKEN") or session.token
    if need_token and not session.token:
        raise CliError(f"not logged in to {session.url}: run `dpip login --url {session.url}` first", EXIT_AUTH)
    return session


def _api(args: argparse.Namespace, **kwargs: object) -> Api:
    session = _session(args)
    from_env = "$DPIP_TOKEN" if os.environ.get("DPIP_TOKEN") == session.token else ""
    return Api(session.url, session.token, token_from=from_env, **kwargs)  # type: ignore[arg-type]


# -- login / logout -----------------------------------------------------------------------------

def cmd_login(args: argparse.Namespace) -> int:
    """Ask for the password before the event loop starts: a Ctrl-C at the prompt then stops
    at once (inside the loop the first one would only cancel the task, waiting for Enter)."""
    session = _session(args, need_token=False)
    user = args.user or session.user or os.environ.get("DPIP_USER") or "admin"
    hint = f" ({PASSWORD_HINT})" if user == "admin" else ""
    password = os.environ.get("DPIP_PASSWORD")
    if password is None:
        if not sys.stdin.isatty():
            raise CliError(f"no password: set DPIP_PASSWORD or run `dpip login` in a terminal"
                           f"{' (the admin password is ' + PASSWORD_HINT + ')' if hint else ''}", EXIT_AUTH)
        password = getpass.getpass(f"password for {user} at {session.url}{hint}: ")
    return asyncio.run(_login(session, user, password, hint))


async def _login(session: Session, user: str, password: str, hint: str) -> int:
    async with Api(session.url, retries=0) as api:
        try:
            token = await api.login(user, password)
        except ApiError as e:
            if e.status == 401:
                raise CliError(f"login refused for {user!r}: wrong user or password{hint}", EXIT_AUTH) from e
            raise
    path = saved.save(Session(session.url, user, token))
    err.print(f"logged in to {session.url} as {user} (token saved in {path})")
    return EXIT_OK


async def cmd_logout(args: argparse.Namespace) -> int:
    session = _session(args, need_token=False)
    if session.token:
        async with Api(session.url, session.token, retries=0) as api:
            try:
                await api.logout()
            except ApiError as e:
                if e.status != 401:  # an expired or revoked token is logged out already
                    raise
    saved.forget()
    err.print(f"logged out of {session.url}")
    return EXIT_OK


# -- tables -------------------------------------------------------------------------------------

async def cmd_status(args: argparse.Namespace) -> int:
    async with _api(args) as api:
        body = await api.status()
    show.as_json(body) if args.json else show.status(body, api.url)
    return EXIT_OK


async def cmd_workers(args: argparse.Namespace) -> int:
    async with _api(args) as api:
        workers = (await api.status())["workers"]
    show.as_json(workers) if args.json else show.out.print(show.workers_table(workers))
    return EXIT_OK


async def cmd_filters(args: argparse.Namespace) -> int:
    async with _api(args) as api:
        listed = await api.filters()
    show.as_json(listed) if args.json else show.out.print(show.filters_table(listed))
    return EXIT_OK


async def cmd_workloads(args: argparse.Namespace) -> int:
    async with _api(args) as api:
        workloads = await api.workloads()
    show.as_json(workloads) if args.json else show.out.print(show.workloads_table(workloads))
    return EXIT_OK


async def cmd_rm(args: argparse.Namespace) -> int:
    """Delete each workload named (by id, or by the name of one of yours); one line each."""
    async with _api(args) as api:
        failed = 0
        for ref in args.workloads:
            wid = ref
            if not _looks_like_id(ref):
                named = await api.workload_named(ref)
                if named is None:
                    print(f"dpip: no workload of yours is named {ref!r}", file=sys.stderr)
                    failed += 1
                    continue
                wid = named["workload_id"]
            try:
                gone = await api.delete_workload(wid)
            except CliError as e:
                print(f"dpip: {ref}: {e}", file=sys.stderr)
                failed += 1
                continue
            show.out.print(f"deleted {gone['workload_name']} ({gone['workload_id']}): {gone['images']} images,"
                           f" {gone['filtered_images']} filtered, {gone['files']} files")
    return EXIT_OK if not failed else EXIT_FAILED


def _looks_like_id(text: str) -> bool:
    return len(text) == 36 and text.count("-") == 4


# -- push / watch / pull ------------------------------------------------------------------------

async def _target(api: Api, args: argparse.Namespace, count: int | None, meta: dict | None = None) -> tuple[dict, bool]:
    """The workload to push into: ``--workload`` (resume), else a new one that records the
    ``count`` of images this push is going to send. Returns it and whether it is new."""
    if args.workload:
        return await api.workload(args.workload), False
    created = await api.create_workload(args.filter, args.name, args.tags, pushes.meta(count, meta),
                                        dict(args.param or []))
    return created, True


async def _push(api: Api, args: argparse.Namespace, workload: dict, created: bool,
                uploads: AsyncGenerator[Upload, None], total: int | None, progress: Progress) -> int:
    """Upload everything; returns how many images the workload has from this push. When it
    stops early, say what the workload holds and whether the same command can finish it."""
    wid = workload["workload_id"]
    err.print(f"workload {wid} ({workload['workload_name']}, {workload['filter']})")
    existing = {}
    if args.workload:  # resuming: what the server has already
        existing = {e["image_id"]: e["size"] for e in await api.list_images(wid, "original")}
    result = PushResult()
    try:
        async with aclosing(uploads):  # closed here, while its decoding thread is still there
            await transfer.upload_all(api, wid, uploads, args.jobs, progress, total, existing, result)
    except (asyncio.CancelledError, KeyboardInterrupt):
        err.print(await _stopped(api, wid, created, result, total, "push interrupted", resumable=True))
        raise
    except CliError as e:
        resumable = e.code == EXIT_UNREACHABLE or (isinstance(e, ApiError) and e.status in RETRYABLE)
        if not created and not resumable:
            raise
        raise CliError(f"{e}; {await _stopped(api, wid, created, result, total, '', resumable)}", e.code) from e
    skipped = f", {result.skipped} already there" if result.skipped else ""
    progress.console.print(f"pushed {result.sent} images ({result.bytes / 1e6:.1f} MB){skipped}")
    return result.sent + result.skipped


async def _stopped(api: Api, wid: str, created: bool, result: PushResult, total: int | None,
                   what: str, resumable: bool) -> str:
    """What a push that stopped early leaves behind. A workload this push created and gave no
    image is removed (there is nothing to resume); otherwise it shows as partial."""
    lead = f"{what}: " if what else ""
    done = result.sent + result.skipped
    if created and done == 0 and await _remove_if_empty(api, wid):
        return f"{lead}nothing was uploaded, workload {wid} removed"
    of = f" of {total}" if total else ""
    state = f"workload {wid} has {done}{of} images (partial)"
    if resumable:
        return f"{lead}{state}: resume with the same command and --workload {wid}"
    return f"{lead}{state}: fix that file, then resume with the same command and --workload {wid}"


async def _remove_if_empty(api: Api, wid: str) -> bool:
    """Best effort, bounded: an upload whose answer was lost may have landed after all."""
    try:
        async with asyncio.timeout(5):
            if await api.list_images(wid, "original"):
                return False
            await api.delete_workload(wid)
            return True
    except (CliError, TimeoutError):
        return False


async def cmd_push(args: argparse.Namespace) -> int:
    files = transfer.collect(args.paths)
    names.check_images(files)  # every file, before anything is created on the server
    async with _api(args, connections=args.jobs) as api:
        workload, created = await _target(api, args, len(files))
        with progress_bar(args.quiet) as progress:
            await _push(api, args, workload, created, transfer.files_as_uploads(files), len(files), progress)
    print(workload["workload_id"])
    return EXIT_OK


async def _watch(api: Api, workload_id: str, quiet: bool, stall_timeout: float) -> transfer.Progressed:
    await api.workload(workload_id)  # an unknown id fails here, before any progress bar is drawn
    with progress_bar(quiet) as progress:
        seen = await transfer.watch(api, workload_id, progress, stall=pushes.Stall(stall_timeout))
    w = seen.workload
    err.print(f"{w['workload_name']}: {pushes.status(w)}, {len(w['filtered_images'])} filtered, "
              f"{len(w.get('failed_images', []))} failed ({seen.elapsed:.1f} s watched)")
    return seen


def _check_finished(seen: transfer.Progressed) -> None:
    """Exit non-zero, with the first reason, if images of the workload failed or never came."""
    w = seen.workload
    if failed := w.get("failed_images"):
        first = failed[0]
        raise CliError(f"{len(failed)} of {w.get('images', '?')} images failed "
                       f"(image {first['image_id']}: {first['reason']})")
    if pushes.missing(w):
        raise CliError(pushes.partial_error(w, seen.idle))


async def cmd_watch(args: argparse.Namespace) -> int:
    async with _api(args) as api:
        _check_finished(await _watch(api, args.workload, args.quiet, args.stall_timeout))
    return EXIT_OK


async def cmd_pull(args: argparse.Namespace) -> int:
    async with _api(args, connections=args.jobs) as api:
        w = await api.workload(args.workload)
        seen = None
        if args.wait:
            seen = await _watch(api, args.workload, args.quiet, args.stall_timeout)
            w = seen.workload
        with progress_bar(args.quiet) as progress:
            fetched, kept = await transfer.pull(api, args.workload, args.dir, args.type, args.jobs, progress,
                                                args.names)
    pending = "" if w["status"] == "completed" else f"; workload still {w['status']}: pull again later"
    if pushes.missing(w):
        pending += f"; only {pushes.uploaded(w)} images were uploaded (partial)"
    err.print(f"downloaded {fetched}, kept {kept} already complete, into {args.dir}{pending}")
    if seen is not None:
        _check_finished(seen)  # what succeeded is downloaded; the exit code still tells
    return EXIT_OK


# -- video --------------------------------------------------------------------------------------

def _video_thread(name: str) -> ThreadPoolExecutor:
    """A PyAV container is used from one thread only (one for decoding, one for encoding)."""
    return ThreadPoolExecutor(1, thread_name_prefix=name)


async def _decoded(path: Path, pool: ThreadPoolExecutor) -> AsyncGenerator[Upload, None]:
    """Frames as uploads, decoded one at a time in ``pool`` while earlier ones upload. Close it
    (``aclosing``) before ``pool`` shuts down: its cleanup runs in that thread."""
    loop = asyncio.get_running_loop()
    frames = _video().frames(path)
    try:
        index = 0
        while (image := await loop.run_in_executor(pool, next, frames, None)) is not None:
            yield Upload(index, f"{index}.png", lambda image=image: _video().png(image))
            index += 1
    finally:
        await asyncio.shield(loop.run_in_executor(pool, frames.close))


async def _video_target(api: Api, args: argparse.Namespace, pool: ThreadPoolExecutor) -> tuple[dict, bool, int | None]:
    info = await asyncio.get_running_loop().run_in_executor(pool, _video().probe, args.input)
    err.print(f"{args.input}: {info.width}x{info.height}, {float(info.fps):.3f} fps, "
              f"{info.frames or 'unknown'} frames, {info.codec}")
    workload, created = await _target(api, args, info.frames or None, info.meta(args.input.name))
    return workload, created, info.frames or None


async def cmd_video_push(args: argparse.Namespace) -> int:
    with _video_thread("decode") as pool:
        async with _api(args, connections=args.jobs) as api:
            workload, created, frames = await _video_target(api, args, pool)
            with progress_bar(args.quiet) as progress:
                await _push(api, args, workload, created, _decoded(args.input, pool), frames, progress)
    print(workload["workload_id"])
    return EXIT_OK


async def _ready_frames(api: Api, workload_id: str, total: asyncio.Future[int] | None,
                        stall: pushes.Stall, interval: float = 0.5) -> AsyncIterator[int]:
    """Frame ids in order, each as soon as its filtered image exists. The count comes from
    ``total`` (a push still going on) or, without one, from the completed workload."""
    next_id = 0
    while True:
        w = await api.workload(workload_id)
        if failed := w.get("failed_images"):
            raise CliError(f"frame {failed[0]['image_id']} failed ({failed[0]['reason']}): no video written")
        filtered = set(w["filtered_images"])
        while next_id in filtered:
            yield next_id
            next_id += 1
        if total is None:
            ended = stall.done(w)
            if ended and pushes.missing(w):
                raise CliError(f"{pushes.partial_error(w, stall.idle())}; no video written")
            count = w["images"] if ended else None
        else:
            count = total.result() if total.done() else None
        if count is not None and next_id >= count:
            return
        if count is not None and total is None:  # completed, yet a frame is missing
            raise CliError(f"workload {workload_id} has no frame {next_id}: not a video's frames 0..{count - 1}")
        await asyncio.sleep(interval)


async def _video_join(api: Api, args: argparse.Namespace, workload: dict, pool: ThreadPoolExecutor,
                      progress: Progress, total: asyncio.Future[int] | None = None) -> None:
    """Join the filtered frames into ``args.output`` while they are being made."""
    wid = workload["workload_id"]
    fps = args.fps or _video().fps_of(workload.get("meta") or {})
    if fps is None:
        fps = Fraction(25)
        err.print("the workload has no frame rate (not pushed by `dpip video push`): using 25 fps")
    writer = _video().Writer(args.output, fps, args.codec)
    loop = asyncio.get_running_loop()
    frames = pushes.expected(workload) or workload.get("images")
    task = progress.add_task("join", total=frames if total is None else None, rate="")
    started = time.monotonic()
    stall = pushes.Stall(getattr(args, "stall_timeout", pushes.STALL_TIMEOUT))
    ready = _ready_frames(api, wid, total, stall)
    try:
        async for data in transfer.in_order(ready, lambda i: api.download(wid, i, "filtered"), 2 * args.jobs):
            await loop.run_in_executor(pool, writer.write, data)
            progress.update(task, advance=1, rate=transfer.rate_text(writer.count, started))
            if total is not None and total.done():
                progress.update(task, total=total.result())
    except BaseException:
        await asyncio.shield(loop.run_in_executor(pool, writer.abort))
        raise
    if writer.count == 0:
        raise CliError(f"no frames to join: {args.output} not written")
    await loop.run_in_executor(pool, writer.close)
    progress.console.print(f"wrote {args.output}: {writer.count} frames at {float(fps):.3f} fps ({writer.codec})")


async def cmd_video_pull(args: argparse.Namespace) -> int:
    _video().Writer.check(args.output, args.codec)
    with _video_thread("encode") as pool:
        async with _api(args, connections=args.jobs) as api:
            workload = await api.workload(args.workload)
            with progress_bar(args.quiet) as progress:
                await _video_join(api, args, workload, pool, progress)
    return EXIT_OK


async def cmd_video_run(args: argparse.Namespace) -> int:
    """Push and join at once: frame k is encoded as soon as it is filtered."""
    _video().Writer.check(args.output, args.codec)  # a bad output name or codec fails before the work
    with _video_thread("decode") as decode, _video_thread("encode") as encode:
        async with _api(args, connections=2 * args.jobs) as api:
            workload, created, frames = await _video_target(api, args, decode)
            total: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            with progress_bar(args.quiet) as progress:

                async def push() -> None:
                    total.set_result(await _push(api, args, workload, created, _decoded(args.input, decode),
                                                 frames, progress))

                await transfer.first_error(push(), _video_join(api, args, workload, encode, progress, total))
    return EXIT_OK


def cmd_video_sample(args: argparse.Namespace) -> int:
    """Blocking work, so not in the event loop: Ctrl-C stops it between two frames."""
    count = _video().sample(args.output, args.seconds, args.fps)
    err.print(f"wrote {args.output}: {count} frames, {args.fps} fps, 320x240")
    return EXIT_OK
