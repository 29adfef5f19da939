"""The floor under the server's CPU per tiny image: what aiohttp alone spends on the reference's
multipart upload, with nothing of DPIP behind it, and what writing the bytes durably adds.

    python -m bench.serverfloor [--images 600] [--clients 8] [--frames DIR]

Each mode runs a bare aiohttp server in its own process and pushes ``--images`` 64x64 PNGs at
it from ``--clients`` plain ``requests`` threads (as ``make bench``'s tiny row does), and prints
the server process's CPU per upload (all its threads, from /proc):

- ``read``: the body read whole and a JSON answer, nothing parsed or stored (aiohttp's HTTP
  handling alone);
- ``parse``: aiohttp's multipart reader over it and a JSON answer, nothing stored;
- ``write``: the bytes written to a new file (in an executor thread);
- ``durable``: and fsynced, file and directory, before the answer (DPIP's rule for uploads);
- ``durable x2``: twice, as a tiny image is written twice (its original and its result).
- ``relay``: ``durable``, then the bytes sent to another process over a loopback TCP stream and
  the same bytes received back (as a job's original goes to a worker and its result comes
  back), and those written unsynced: the least the server does per image with the file store.

With ``--frames DIR`` the images are that directory's files (e.g. ``bench-out/frames-1280x720``,
made by ``make bench``) instead of tiny PNGs: the floor under the 720p row.

DPIP does all of ``durable x2`` per tiny image plus its datastore, the job's RPC and the
workers' traffic; the figure says how far below it DPIP's own CPU per image can go on this
machine while each upload is on disk before its 2xx.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

from harness.frames import frame_png
from harness.proccpu import process_cpu
from harness.refclient import multipart

MODES = {"read": 0, "parse": 0, "write": 0, "durable": 1, "durable x2": 2, "relay": 1}
#: Files are written in pieces of this size (as DPIP's group writer does: one write of a whole
#: 1.4 MB frame costs several times the kernel CPU here).
PIECE = 256 * 1024


def _echo(port: int) -> None:
    """The child standing for a worker: each length-prefixed message back as it came."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.read(4):
            head += await reader.readexactly(4 - len(head))
            writer.write(head + await reader.readexactly(int.from_bytes(head, "big")))
            await writer.drain()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", port, limit=1 << 20)
        await server.serve_forever()
    asyncio.run(main())


def _serve(port: int, mode: str, root: Path, echo_port: int = 0) -> None:
    """The child: an aiohttp server that does ``mode`` per upload."""
    from aiohttp import web

    pool = ThreadPoolExecutor(1)  # one writer thread, as DPIP's
    counter = iter(range(10**9))
    dir_fd = os.open(root, os.O_RDONLY)

    def store(data: bytes, n: int, durable: bool) -> None:
        _write(root / f"{n}.png", [data], durable, dir_fd)

    async def upload(request: web.Request) -> web.Response:
        if mode == "read":
            return web.json_response({"id": 1, "bytes": len(await request.read())})
        data = b""
        reader = await request.multipart()
        async for part in reader:
            if part.name == "data":
                data = await part.read()
            else:
                await part.text()
        if mode != "parse":
            loop = asyncio.get_running_loop()
            for _ in range(max(1, MODES[mode])):
                await loop.run_in_executor(pool, store, data, next(counter), MODES[mode] > 0)
        if mode == "relay":
            reader, writer = await peers.get()
            try:
                writer.write(len(data).to_bytes(4, "big") + data)
                back = await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big"))
            finally:
                peers.put_nowait((reader, writer))
            await loop.run_in_executor(pool, store, back, next(counter), False)
        return web.json_response({"id": 1, "bytes": len(data)})

    peers: asyncio.Queue = asyncio.Queue()

    async def connect(app: web.Application) -> None:
        if mode == "relay":
            for _ in range(8):
                peers.put_nowait(await asyncio.open_connection("127.0.0.1", echo_port, limit=1 << 20))

    app = web.Application(client_max_size=64 << 20)
    app.on_startup.append(connect)
    app.router.add_post("/images", upload)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _sink(port: int, reply: int) -> None:
    """The child standing for a worker in the lean floor: each length-prefixed message taken,
    ``reply`` bytes sent back for it (a result's size)."""
    from common.aio import run

    answer = bytes(reply)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.read(4):
            head += await reader.readexactly(4 - len(head))
            await reader.readexactly(int.from_bytes(head, "big"))
            writer.write(len(answer).to_bytes(4, "big") + answer)
            await writer.drain()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", port, limit=1 << 20)
        await server.serve_forever()
    run(main())


def _serve_lean(port: int, root: Path, sink_port: int, view_ids: int) -> None:
    """The lean floor's child: aiohttp on uvloop (as DPIP runs), doing per upload only what a
    server that keeps each upload and has a worker filter it cannot avoid, each step the
    cheapest way this stack has: the body taken as it comes (no multipart parser, no join),
    written durably in 256 KiB pieces on the loop itself (no thread trip), recorded in SQLite
    (its row, one synced commit; as DPIP's own file, WAL), sent to the worker (the sink) as it
    is, the result (``--result-bytes``) received, written unsynced and recorded (one unsynced
    commit). ``POST /accept``: only the upload's own part (received, written durably, recorded,
    answered). And ``GET /view``: a workload's view of ``view_ids`` filtered ids, from memory."""
    import sqlite3

    from aiohttp import web

    from common.aio import run

    counter = iter(range(10**9))
    dir_fd = os.open(root, os.O_RDONLY)
    view = {"workload_id": "w", "status": "running", "images": view_ids,
            "filtered_images": list(range(view_ids)), "failed_images": []}
    db = sqlite3.connect(root / "floor.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, bytes INTEGER, status TEXT, result INTEGER)")
    synchronous = [""]

    def record(sql: str, args: tuple, durable: bool) -> int:
        wanted = "FULL" if durable else "OFF"
        if synchronous[0] != wanted:
            db.execute(f"PRAGMA synchronous={wanted}")
            synchronous[0] = wanted
        db.execute("BEGIN")
        row = db.execute(sql, args).lastrowid
        db.execute("COMMIT")
        return row or 0

    def store(chunks: list[bytes], durable: bool) -> None:
        _write(root / f"{next(counter)}.png", chunks, durable, dir_fd)

    spent = {"durable write": 0.0, "datastore": 0.0, "send to the worker": 0.0, "result written": 0.0}  # CPU s

    async def accepted(request: web.Request) -> tuple[list[bytes], int, int]:
        chunks = [chunk async for chunk in request.content.iter_any()]
        size = sum(len(c) for c in chunks)
        t0 = time.thread_time()
        store(chunks, True)
        t1 = time.thread_time()
        image = record("INSERT INTO images (bytes, status) VALUES (?, 'queued')", (size,), True)
        spent["durable write"] += t1 - t0
        spent["datastore"] += time.thread_time() - t1
        return chunks, size, image

    async def accept(request: web.Request) -> web.Response:
        _, size, image = await accepted(request)
        return web.json_response({"id": image, "bytes": size})

    async def upload(request: web.Request) -> web.Response:
        chunks, size, image = await accepted(request)
        reader, writer = await peers.get()
        try:
            t0 = time.thread_time()
            writer.writelines([size.to_bytes(4, "big"), *chunks])
            spent["send to the worker"] += time.thread_time() - t0
            back = await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big"))
        finally:
            peers.put_nowait((reader, writer))
        t0 = time.thread_time()
        store([back], False)
        t1 = time.thread_time()
        record("UPDATE images SET status = 'done', result = ? WHERE id = ?", (len(back), image), False)
        spent["result written"] += t1 - t0
        spent["datastore"] += time.thread_time() - t1
        return web.json_response({"id": image, "bytes": size})

    async def get_view(request: web.Request) -> web.Response:
        return web.json_response(view)

    async def get_spent(request: web.Request) -> web.Response:
        return web.json_response(spent)

    peers: asyncio.Queue = asyncio.Queue()

    async def main() -> None:
        for _ in range(8):
            peers.put_nowait(await asyncio.open_connection("127.0.0.1", sink_port, limit=1 << 20))
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/images", upload)
        app.router.add_post("/accept", accept)
        app.router.add_get("/view", get_view)
        app.router.add_get("/spent", get_spent)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()
    run(main())


@dataclass(frozen=True)
class Floor:
    """The lean floor's server CPU (ms): per upload (and the steps measured inside it, the
    rest being aiohttp's receiving and answering), per GET of a view."""

    upload_ms: float
    get_ms: float
    steps: dict[str, float]

    def breakdown(self) -> str:
        rest = self.upload_ms - sum(self.steps.values())
        return ", ".join([f"the upload received and answered {rest:.2f}"] +
                         [f"{k} {v:.2f}" for k, v in self.steps.items()])


@contextlib.contextmanager
def lean_server(result_bytes: int = 300, view_ids: int = 200, scratch: Path | None = None) -> Iterator[tuple[str, int]]:
    """The lean server (and its stand-in worker, answering ``result_bytes`` per job) running:
    its URL and process id. Its files go into ``scratch`` if given, emptied on return and
    removed by the caller at its end (on this machine's journal-less ext4, creating files costs
    several times more for half a minute after many were deleted nearby, as the allocator skips
    recently deleted inodes one by one; and hundreds of MB left dirty would be written back
    under the next measurement), else a temporary directory removed on return."""
    port, sink_port = _free_port(), _free_port()
    if scratch is not None:
        scratch.mkdir(parents=True)
    with tempfile.TemporaryDirectory() if scratch is None else contextlib.nullcontext(str(scratch)) as root:
        sink = subprocess.Popen([sys.executable, "-m", "bench.serverfloor", "--sink", str(sink_port),
                                 "--result-bytes", str(result_bytes)])
        server = None
        try:
            _wait_listening(sink_port, sink)  # (the server connects to it as it starts)
            server = subprocess.Popen([sys.executable, "-m", "bench.serverfloor", "--serve", "lean", "--port",
                                       str(port), "--root", root, "--echo-port", str(sink_port),
                                       "--view-ids", str(view_ids)])
            url = f"http://127.0.0.1:{port}"
            _wait_up(url + "/view", server)
            yield url, server.pid
        finally:
            for child in (server, sink):
                if child is not None:
                    child.terminate()
                    child.wait(10)
            if scratch is not None:  # emptied now (their pages dropped, none written back under
                for f in scratch.iterdir():  # the next measurement), unlinked at the caller's end
                    os.truncate(f, 0)


def _bodies(images: list[bytes], n: int) -> list[tuple[bytes, str]]:
    return [multipart({"workload_id": "w", "type": "original"}, "data", f"{i}.png", images[i % len(images)])
            for i in range(n)]


def lean_floor(frames: list[bytes], clients: int, result_bytes: int, view_ids: int,
               uploads: int = 200, gets: int = 500, scratch: Path | None = None) -> Floor:
    """The lean floor per upload of ``frames`` (server CPU ms, by step) and per ``GET`` of a
    view of ``view_ids`` ids, each measured alone (files in ``scratch``: :func:`lean_server`)."""
    with lean_server(result_bytes, view_ids, scratch) as (url, pid):
        bodies = _bodies(frames, uploads + 20)
        _push(url + "/images", bodies[:20], clients)
        before = process_cpu(pid)
        steps0 = requests.get(url + "/spent").json()
        _push(url + "/images", bodies[20:], clients)
        upload_ms = 1000 * (process_cpu(pid) - before).total / uploads
        steps = {k: 1000 * (v - steps0[k]) / uploads for k, v in requests.get(url + "/spent").json().items()}
        with requests.Session() as session:
            before = process_cpu(pid)
            for _ in range(gets):
                session.get(url + "/view").raise_for_status()
            get_ms = 1000 * (process_cpu(pid) - before).total / gets
        return Floor(upload_ms, get_ms, steps)


def round_trip_floor(images: list[bytes], scratch: Path | None = None, warm: int = 50) -> list[float]:
    """The least one image's round trip can take with the course's client (one ``requests``
    session, one image at a time) on this machine: the lean server takes the upload, writes
    and records it durably, has the stand-in worker answer it (no filtering at all) and records
    the result, all before it answers; then the one ``GET`` any client needs to see it done.
    Each round trip's wall time (ms), sorted (the first ``warm`` left out)."""
    times = []
    with lean_server(300, 200, scratch) as (url, _), requests.Session() as session:
        session.headers["Authorization"] = "Bearer x"
        for i, (body, ctype) in enumerate(_bodies(images, warm + len(images))):
            t0 = time.perf_counter()
            session.post(url + "/images", data=body, headers={"Content-Type": ctype}).raise_for_status()
            session.get(url + "/view").json()
            if i >= warm:
                times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)


def fill_seconds(images: list[bytes], clients: int, scratch: Path | None = None) -> float:
    """How long ``clients`` fresh ``requests`` sessions take to upload ``images`` to the lean
    server's ``/accept`` (each received, written and recorded durably, answered: nothing
    more), timed as the bench's pushes are, from before the sessions start: the least time in
    which a fleet's slots can all have their first image."""
    with lean_server(300, 200, scratch) as (url, _):
        _push(url + "/accept", _bodies(images, 20), clients)  # (the server's own first requests)
        bodies = _bodies(images, len(images))
        t0 = time.perf_counter()
        _push(url + "/accept", bodies, clients)
        return time.perf_counter() - t0


def _write(path: Path, chunks: list[bytes], durable: bool, dir_fd: int) -> None:
    """Straight to its name (no temporary, no rename), in pieces: as DPIP's group writer;
    ``durable``: synced, and its directory (``dir_fd``) too."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in chunks:
            piece = memoryview(chunk)
            while piece:
                piece = piece[os.write(fd, piece[:PIECE]):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    if durable:
        os.fsync(dir_fd)


def _push(url: str, bodies: list[tuple[bytes, str]], clients: int) -> None:
    """POST every multipart body to ``url`` from ``clients`` plain ``requests`` threads."""
    def push(part: list[tuple[bytes, str]]) -> None:
        with requests.Session() as session:
            for body, ctype in part:
                session.post(url, data=body, headers={"Content-Type": ctype,
                                                      "Authorization": "Bearer x"}).raise_for_status()

    with ThreadPoolExecutor(clients) as threads:
        list(threads.map(push, [bodies[i::clients] for i in range(clients)]))


def _wait_listening(port: int, child: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or child.poll() is not None:
                raise RuntimeError("the floor's stand-in worker did not start") from None
            time.sleep(0.05)


def _wait_up(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the floor's server did not start") from None
            time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(mode: str, images: int, clients: int, frames: list[bytes]) -> float:
    """Server CPU milliseconds per upload in ``mode``."""
    port, echo_port = _free_port(), _free_port()
    with tempfile.TemporaryDirectory() as root:
        echo = subprocess.Popen([sys.executable, "-m", "bench.serverfloor", "--echo", str(echo_port)])
        server = subprocess.Popen([sys.executable, "-m", "bench.serverfloor", "--serve", mode,
                                   "--port", str(port), "--root", root, "--echo-port", str(echo_port)])
        try:
            url = f"http://127.0.0.1:{port}/images"
            _wait_up(url, server)
            bodies = [multipart({"workload_id": "w", "type": "original"}, "data", f"{i}.png",
                                frames[i % len(frames)] if frames else frame_png(i, 64, 64))
                      for i in range(images + 100)]
            _push(url, bodies[:100], clients)  # warm up
            before = process_cpu(server.pid)
            _push(url, bodies[100:], clients)
            spent = process_cpu(server.pid) - before
            return 1000 * spent.total / images
        finally:
            for child in (server, echo):
                child.terminate()
                child.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--echo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--echo-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result-bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--view-ids", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=Path, help="a directory of images to upload instead of tiny PNGs")
    parser.add_argument("--modes", default=",".join(MODES), help="which, in this order (default: all)")
    args = parser.parse_args()
    if args.echo:
        _echo(args.echo)
        return
    if args.sink:
        _sink(args.sink, args.result_bytes)
        return
    if args.serve == "lean":
        _serve_lean(args.port, args.root, args.echo_port, args.view_ids)
        return
    if args.serve:
        _serve(args.port, args.serve, args.root, args.echo_port)
        return
    frames = [f.read_bytes() for f in sorted(args.frames.iterdir())[:50]] if args.frames else []
    for mode in args.modes.split(","):
        print(f"{mode:12s} {measure(mode, args.images, args.clients, frames):6.2f} ms of server CPU per upload",
              flush=True)


if __name__ == "__main__":
    main()
