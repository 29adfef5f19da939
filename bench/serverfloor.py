"""The floor under the server's CPU per tiny image: what aiohttp alone spends on the reference's
multipart upload, with nothing of DPIP behind it, and what writing the bytes durably adds.

    python -m bench.serverfloor [--images 600] [--clients 8]

Each mode runs a bare aiohttp server in its own process and pushes ``--images`` 64x64 PNGs at
it from ``--clients`` plain ``requests`` threads (as ``make bench``'s tiny row does), and prints
the server process's CPU per upload (all its threads, from /proc):

- ``read``: the body read whole and a JSON answer, nothing parsed or stored (aiohttp's HTTP
  handling alone);
- ``parse``: aiohttp's multipart reader over it and a JSON answer, nothing stored;
- ``write``: the bytes written to a new file, renamed into place (in an executor thread);
- ``durable``: and fsynced, file and directory, before the answer (DPIP's rule for uploads);
- ``durable x2``: twice, as a tiny image is written twice (its original and its result).

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

MODES = {"read": 0, "parse": 0, "write": 0, "durable": 1, "durable x2": 2}


def _serve(port: int, mode: str, root: Path) -> None:
    """The child: an aiohttp server that does ``mode`` per upload."""
    from aiohttp import web

    pool = ThreadPoolExecutor(4)
    counter = iter(range(10**9))

    def store(data: bytes, n: int, durable: bool) -> None:
        tmp = root / f".{n}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, root / f"{n}.png")
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
        return web.json_response({"id": 1, "bytes": len(data)})

    app = web.Application()
    app.router.add_post("/images", upload)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(mode: str, images: int, clients: int) -> float:
    """Server CPU milliseconds per upload in ``mode``."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as root:
        server = subprocess.Popen([sys.executable, "-m", "bench.serverfloor", "--serve", mode,
                                   "--port", str(port), "--root", root])
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
                                frame_png(i, 64, 64)) for i in range(images + 100)]

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
            server.terminate()
            server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.port, args.serve, args.root)
        return
    for mode in MODES:
        print(f"{mode:12s} {measure(mode, args.images, args.clients):6.2f} ms of server CPU per upload",
              flush=True)


if __name__ == "__main__":
    main()
