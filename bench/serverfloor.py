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
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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

    def store(data: bytes, n: int, durable: bool) -> None:
        # Straight to its name (no temporary, no rename), in pieces: as DPIP's group writer.
        fd = os.open(root / f"{n}.png", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view[:PIECE]):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if durable:
            fd = os.open(root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

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
            deadline = time.monotonic() + 30
            while True:
                try:
                    requests.get(url, timeout=1)
                    break
                except requests.ConnectionError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError(f"the {mode} server did not start")
                    time.sleep(0.05)
            bodies = [multipart({"workload_id": "w", "type": "original"}, "data", f"{i}.png",
                                frames[i % len(frames)] if frames else frame_png(i, 64, 64))
                      for i in range(images + 100)]

            def push(part: list[tuple[bytes, str]]) -> None:
                with requests.Session() as session:
                    for body, ctype in part:
                        session.post(url, data=body, headers={"Content-Type": ctype,
                                                              "Authorization": "Bearer x"}).raise_for_status()

            def run(batch: list[tuple[bytes, str]]) -> None:
                with ThreadPoolExecutor(clients) as threads:
                    list(threads.map(push, [batch[i::clients] for i in range(clients)]))

            run(bodies[:100])  # warm up
            before = process_cpu(server.pid)
            run(bodies[100:])
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
    parser.add_argument("--frames", type=Path, help="a directory of images to upload instead of tiny PNGs")
    parser.add_argument("--modes", default=",".join(MODES), help="which, in this order (default: all)")
    args = parser.parse_args()
    if args.echo:
        _echo(args.echo)
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
