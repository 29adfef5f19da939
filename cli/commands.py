"""``dpip``: log in, push images or a video, watch, pull, and read the system's state.

Exit codes: 0 done; 1 failed (the server refused, images failed); 2 bad usage; 3 not logged in
or refused credentials; 4 server unreachable; 130 interrupted. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

from rich.progress import Progress

from common import filters
from cli import config, show, transfer, video
from cli.client import Api, ApiError
from cli.config import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    CliError,
    Session,
)
from cli.transfer import Upload, err, progress_bar

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def _session(args: argparse.Namespace, need_token: bool = True) -> Session:
    session = config.load()
    if getattr(args, "url", None):
        session = config.at_url(session, args.url)
        session.token = os.environ.get("DPIP_TOKEN") or session.token
    if need_token and not session.token:
        raise CliError(f"not logged in to {session.url}: run `dpip login --url {session.url}` first", EXIT_AUTH)
    return session


def _api(args: argparse.Namespace, **kwargs: Any) -> Api:
    session = _session(args)
    return Api(session.url, session.token, **kwargs)


# -- login / logout -----------------------------------------------------------------------------

async def cmd_login(args: argparse.Namespace) -> int:
    session = _session(args, need_token=False)
    user = args.user or session.user or os.environ.get("DPIP_USER") or "admin"
    password = os.environ.get("DPIP_PASSWORD")
    if password is None:
        if not sys.stdin.isatty():
            raise CliError("no password: set DPIP_PASSWORD or run `dpip login` in a terminal", EXIT_AUTH)
        password = getpass.getpass(f"password for {user} at {session.url}: ")
    async with Api(session.url, retries=0) as api:
        try:
            token = await api.login(user, password)
        except ApiError as e:
            if e.status == 401:
                raise CliError(f"login refused for {user!r}: wrong user or password", EXIT_AUTH) from e
            raise
    path = config.save(Session(session.url, user, token))
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
    config.forget()
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


async def cmd_workloads(args: argparse.Namespace) -> int:
    async with _api(args) as api:
        workloads = await api.workloads()
    show.as_json(workloads) if args.json else show.out.print(show.workloads_table(workloads))
    return EXIT_OK


# -- push / watch / pull ------------------------------------------------------------------------

async def _target(api: Api, args: argparse.Namespace, meta: dict | None = None) -> dict:
    """The workload to push into: ``--workload`` (resume), else a new one."""
    if args.workload:
        return await api.workload(args.workload)
    return await api.create_workload(args.filter, args.name, args.tags, meta, dict(args.param or []))


async def _push(api: Api, args: argparse.Namespace, workload: dict, uploads: AsyncIterator[Upload],
                total: int | None, progress: Progress) -> int:
    """Upload everything; returns how many images the workload has from this push."""
    wid = workload["workload_id"]
    err.print(f"workload {wid} ({workload['workload_name']}, {workload['filter']})")
    existing = {}
    if args.workload:  # resuming: what the server has already
        existing = {e["image_id"]: e["size"] for e in await api.list_images(wid, "original")}
    try:
        result = await transfer.upload_all(api, wid, uploads, args.jobs, progress, total, existing)
    except (asyncio.CancelledError, KeyboardInterrupt):
        err.print(f"push interrupted: resume with the same command and --workload {wid}")
        raise
    except CliError as e:
        raise CliError(f"{e} (resume with the same command and --workload {wid})", e.code) from e
    skipped = f", {result.skipped} already there" if result.skipped else ""
    progress.console.print(f"pushed {result.sent} images ({result.bytes / 1e6:.1f} MB){skipped}")
    return result.sent + result.skipped


async def cmd_push(args: argparse.Namespace) -> int:
    files = transfer.collect(args.paths)
    async with _api(args, connections=args.jobs) as api:
        workload = await _target(api, args)
        with progress_bar(args.quiet) as progress:
            await _push(api, args, workload, transfer.files_as_uploads(files), len(files), progress)
    print(workload["workload_id"])
    return EXIT_OK


async def _watch(api: Api, workload_id: str, quiet: bool) -> dict:
    await api.workload(workload_id)  # an unknown id fails here, before any progress bar is drawn
    with progress_bar(quiet) as progress:
        seen = await transfer.watch(api, workload_id, progress)
    w = seen.workload
    err.print(f"{w['workload_name']}: completed, {len(w['filtered_images'])} filtered, "
              f"{len(w.get('failed_images', []))} failed ({seen.elapsed:.1f} s watched)")
    return w


def _check_failures(w: dict) -> None:
    """Exit non-zero, with the first reason, if images of the workload failed."""
    if failed := w.get("failed_images"):
        first = failed[0]
        raise CliError(f"{len(failed)} of {w.get('images', '?')} images failed "
                       f"(image {first['image_id']}: {first['reason']})")


async def cmd_watch(args: argparse.Namespace) -> int:
    async with _api(args) as api:
        _check_failures(await _watch(api, args.workload, args.quiet))
    return EXIT_OK


async def cmd_pull(args: argparse.Namespace) -> int:
    async with _api(args, connections=args.jobs) as api:
        w = await api.workload(args.workload)
        if args.wait:
            w = await _watch(api, args.workload, args.quiet)
        with progress_bar(args.quiet) as progress:
            fetched, kept = await transfer.pull(api, args.workload, args.dir, args.type, args.jobs, progress)
    pending = "" if w["status"] == "completed" else f"; workload still {w['status']}: pull again later"
    err.print(f"downloaded {fetched}, kept {kept} already complete, into {args.dir}{pending}")
    if args.wait:
        _check_failures(w)  # what succeeded is downloaded; the exit code still tells
    return EXIT_OK


# -- video --------------------------------------------------------------------------------------

def _video_thread(name: str) -> ThreadPoolExecutor:
    """A PyAV container is used from one thread only (one for decoding, one for encoding)."""
    return ThreadPoolExecutor(1, thread_name_prefix=name)


async def _decoded(path: Path, pool: ThreadPoolExecutor) -> AsyncIterator[Upload]:
    """Frames as uploads, decoded one at a time in ``pool`` while earlier ones upload."""
    loop = asyncio.get_running_loop()
    frames = video.frames(path)
    try:
        index = 0
        while (image := await loop.run_in_executor(pool, next, frames, None)) is not None:
            yield Upload(index, f"{index}.png", lambda image=image: video.png(image))
            index += 1
    finally:
        await loop.run_in_executor(pool, frames.close)


async def _video_target(api: Api, args: argparse.Namespace, pool: ThreadPoolExecutor) -> tuple[dict, int | None]:
    info = await asyncio.get_running_loop().run_in_executor(pool, video.probe, args.input)
    err.print(f"{args.input}: {info.width}x{info.height}, {float(info.fps):.3f} fps, "
              f"{info.frames or 'unknown'} frames, {info.codec}")
    return await _target(api, args, info.meta(args.input.name)), info.frames or None


async def cmd_video_push(args: argparse.Namespace) -> int:
    with _video_thread("decode") as pool:
        async with _api(args, connections=args.jobs) as api:
            workload, frames = await _video_target(api, args, pool)
            with progress_bar(args.quiet) as progress:
                await _push(api, args, workload, _decoded(args.input, pool), frames, progress)
    print(workload["workload_id"])
    return EXIT_OK


async def _ready_frames(api: Api, workload_id: str, total: asyncio.Future[int] | None,
                        interval: float = 0.5) -> AsyncIterator[int]:
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
            count = w["images"] if w["status"] == "completed" else None
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
    fps = args.fps or video.fps_of(workload.get("meta") or {})
    if fps is None:
        fps = Fraction(25)
        err.print("the workload has no frame rate (not pushed by `dpip video push`): using 25 fps")
    writer = video.Writer(args.output, fps, args.codec)
    loop = asyncio.get_running_loop()
    task = progress.add_task("join", total=workload.get("images") if total is None else None, rate="")
    started = time.monotonic()
    ready = _ready_frames(api, wid, total)
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
    video.Writer.check(args.output, args.codec)
    with _video_thread("encode") as pool:
        async with _api(args, connections=args.jobs) as api:
            workload = await api.workload(args.workload)
            with progress_bar(args.quiet) as progress:
                await _video_join(api, args, workload, pool, progress)
    return EXIT_OK


async def cmd_video_run(args: argparse.Namespace) -> int:
    """Push and join at once: frame k is encoded as soon as it is filtered."""
    video.Writer.check(args.output, args.codec)  # a bad output name or codec fails before the work
    with _video_thread("decode") as decode, _video_thread("encode") as encode:
        async with _api(args, connections=2 * args.jobs) as api:
            workload, frames = await _video_target(api, args, decode)
            total: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            with progress_bar(args.quiet) as progress:

                async def push() -> None:
                    total.set_result(await _push(api, args, workload, _decoded(args.input, decode), frames, progress))

                await transfer.first_error(push(), _video_join(api, args, workload, encode, progress, total))
    return EXIT_OK


async def cmd_video_sample(args: argparse.Namespace) -> int:
    count = await asyncio.to_thread(video.sample, args.output, args.seconds, args.fps)
    err.print(f"wrote {args.output}: {count} frames, {args.fps} fps, 320x240")
    return EXIT_OK


# -- arguments ----------------------------------------------------------------------------------

def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="server address (default: the one you logged in to, or $DPIP_URL)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    tables = argparse.ArgumentParser(add_help=False)
    tables.add_argument("--json", action="store_true", help="print the server's JSON instead of a table")
    jobs = argparse.ArgumentParser(add_help=False)
    jobs.add_argument("--jobs", "-j", type=_positive, default=4, metavar="K", help="transfers at a time (4)")
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--filter", "-f", choices=list(filters.REGISTRY), default=filters.DEFAULT,
                        help=f"{' or '.join(filters.REGISTRY)} (default {filters.DEFAULT})")
    names = ", ".join(sorted(filters.param_names()))
    target.add_argument("--param", "-p", type=_param, action="append", metavar="NAME=VALUE",
                        help=f"a filter parameter, e.g. radius=5 for blur ({names}); the server checks it")
    target.add_argument("--name", "-n", help="workload name (default: generated)")
    target.add_argument("--tags", "-t", help="comma-separated worker tags the jobs require")
    target.add_argument("--workload", "-w", metavar="ID",
                        help="push into this existing workload (resumes an interrupted push)")

    p = argparse.ArgumentParser(prog="dpip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Command, help: str, parents: list | None = None, into=sub) -> argparse.ArgumentParser:
        cmd = into.add_parser(name, help=help, description=help, parents=[common, *(parents or [])])
        cmd.set_defaults(run=fn)
        return cmd

    login = add("login", cmd_login, "log in and keep the token (password from $DPIP_PASSWORD or a prompt)")
    login.add_argument("--user", "-u", help="user name (default: the last one, else admin)")
    add("logout", cmd_logout, "revoke the token and forget it")
    add("status", cmd_status, "system name, workers and your active workloads", [tables])
    add("workers", cmd_workers, "the workers: alive, tags, CPU, memory, GPU, jobs", [tables])
    add("workloads", cmd_workloads, "your workloads and their progress", [tables])
    push = add("push", cmd_push, "upload image files or directories into a new workload; prints its id",
               [jobs, target])
    push.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    watch = add("watch", cmd_watch, "show a workload's progress until it is completed")
    watch.add_argument("workload", metavar="WORKLOAD")
    pull = add("pull", cmd_pull, "download a workload's images as <id>.<ext>; skips complete files", [jobs])
    pull.add_argument("workload", metavar="WORKLOAD")
    pull.add_argument("dir", type=Path, metavar="DIR")
    pull.add_argument("--type", choices=("filtered", "original"), default="filtered")
    pull.add_argument("--wait", action="store_true", help="wait until the workload is completed first")

    vid = sub.add_parser("video", help="video in, video out (push, pull, run, sample)",
                         description="video in, video out").add_subparsers(dest="video", required=True, metavar="COMMAND")
    vpush = add("push", cmd_video_push, "decode a video and push its frames as they come; prints the workload id",
                [jobs, target], into=vid)
    vpush.add_argument("input", type=Path, metavar="IN")
    out_opts = argparse.ArgumentParser(add_help=False)
    out_opts.add_argument("--fps", type=Fraction, help="frame rate (default: the source's)")
    out_opts.add_argument("--codec", help="encoder (default by extension: libx264 for .mp4/.mkv/.mov)")
    vpull = add("pull", cmd_video_pull, "wait for a video workload, then join its frames into OUT",
                [jobs, out_opts], into=vid)
    vpull.add_argument("workload", metavar="WORKLOAD")
    vpull.add_argument("output", type=Path, metavar="OUT")
    vrun = add("run", cmd_video_run, "push IN, wait, and write the filtered video to OUT",
               [jobs, target, out_opts], into=vid)
    vrun.add_argument("input", type=Path, metavar="IN")
    vrun.add_argument("output", type=Path, metavar="OUT")
    vsample = add("sample", cmd_video_sample, "write a small synthetic clip to try DPIP with", into=vid)
    vsample.add_argument("output", type=Path, metavar="OUT")
    vsample.add_argument("--seconds", type=float, default=3.0)
    vsample.add_argument("--fps", type=_positive, default=12)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return asyncio.run(args.run(args))
    except CliError as e:
        print(f"dpip: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("dpip: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EOFError:
        print("dpip: no password given", file=sys.stderr)
        return EXIT_AUTH
    except video.av.FFmpegError as e:  # before OSError: some are both
        print(f"dpip: video: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:  # a local file: unreadable input, unwritable output
        print(f"dpip: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILED
