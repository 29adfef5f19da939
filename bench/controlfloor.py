"""The floor under the control cost: the least a scheduling server spends per job on this stack.

``make bench-cluster`` measures DPIP's scheduling server's CPU per job while another server
takes the uploads (the control cost). This module measures, in the same run and at the same
rate of jobs, a bare scheduler that does per job only what no scheduling server on PostgreSQL
can leave out, each step the cheapest way this stack allows (Python, uvloop, asyncpg):

1. it hears of the job from the server that enqueued it (a ``NOTIFY`` carrying the job's id,
   on a connection that ``LISTEN``\\ s);
2. it sends the job to a worker (a length-prefixed message over a TCP stream kept open: no
   MAC, no envelope, no placement);
3. it receives the worker's reply (the result's few facts; the worker is taken to have put the
   result into the object store itself, and nothing of it is judged);
4. it records the job done in the shared datastore: one ``UPDATE`` by primary key, on a
   connection that does not wait for the disk (as DPIP's result statement).

The enqueuing side (a row inserted and a ``NOTIFY`` in one statement, at the given rate) and the
stand-in worker (each job answered at once) run in other processes, as the standby and the
workers do for DPIP. The figure is the bare scheduler's CPU (user + kernel, from /proc) per job.

    .venv/bin/python -m bench.controlfloor --dsn postgresql://... [--jobs 600] [--rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from harness.proccpu import process_cpu

CHANNEL = "floor_jobs"
#: What a job's message and a worker's reply carry besides the id (a job's few facts).
JOB_BYTES = 96
REPLY_BYTES = 64


@dataclass(frozen=True)
class ControlFloor:
    """The bare scheduler's CPU (ms) per job, at ``rate`` jobs per second."""

    ms_per_job: float
    rate: float
    jobs: int


def _message(job_id: int, size: int) -> bytes:
    body = job_id.to_bytes(8, "big") + bytes(size)
    return len(body).to_bytes(4, "big") + body


async def _read(reader: asyncio.StreamReader) -> int:
    """One length-prefixed message's job id (EOFError at the end)."""
    head = await reader.readexactly(4)
    body = await reader.readexactly(int.from_bytes(head, "big"))
    return int.from_bytes(body[:8], "big")


def _worker(port_file: str) -> None:
    """The child standing for a worker: each job answered at once with a reply."""
    import uvloop

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                writer.write(_message(await _read(reader), REPLY_BYTES))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        with open(port_file + ".tmp", "w") as f:
            f.write(str(server.sockets[0].getsockname()[1]))
        os.replace(port_file + ".tmp", port_file)
        await server.serve_forever()

    uvloop.run(main())


def _scheduler(dsn: str, worker_port: int, ready_file: str) -> None:
    """The child: the bare scheduler (see the module's description)."""
    import asyncpg
    import uvloop

    async def main() -> None:
        listening = await asyncpg.connect(dsn)
        recording = await asyncpg.connect(dsn, server_settings={"synchronous_commit": "off"})
        reader, writer = await asyncio.open_connection("127.0.0.1", worker_port)
        done: asyncio.Queue[int] = asyncio.Queue()

        def heard(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            writer.write(_message(int(payload), JOB_BYTES))

        async def receive() -> None:
            while True:
                done.put_nowait(await _read(reader))

        async def record() -> None:
            while True:
                await recording.execute("UPDATE floor_jobs SET state = 'done', finished_at = $2 WHERE id = $1",
                                        await done.get(), time.time())

        await listening.add_listener(CHANNEL, heard)
        with open(ready_file, "w") as f:
            f.write("listening")
        await asyncio.gather(receive(), record())

    uvloop.run(main())


def _wait_file(path: str, child: subprocess.Popen) -> str:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline or child.poll() is not None:
            raise RuntimeError("the control floor's stand-in did not start")
        time.sleep(0.02)
    with open(path) as f:
        return f.read()


async def _enqueue(dsn: str, jobs: int, rate: float) -> int:
    """``jobs`` rows inserted and notified, one a ``1 / rate`` seconds (as uploads to another
    server would be), then wait until all are done; the table made first."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        start = time.monotonic()
        for n in range(jobs):
            await conn.execute(f"WITH j AS (INSERT INTO floor_jobs(state) VALUES ('queued') RETURNING id)"
                               f" SELECT pg_notify('{CHANNEL}', id::text) FROM j")
            pause = start + (n + 1) / rate - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
        deadline = time.monotonic() + 60
        while (left := await conn.fetchval("SELECT count(*) FROM floor_jobs WHERE state <> 'done'")) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return left
    finally:
        await conn.close()


async def _table(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS floor_jobs; CREATE TABLE floor_jobs (id bigserial PRIMARY KEY,"
                           " state text NOT NULL, finished_at double precision)")
    finally:
        await conn.close()


def control_floor(dsn: str, jobs: int, rate: float, folder: str) -> ControlFloor:
    """The bare scheduler's CPU per job for ``jobs`` jobs enqueued at ``rate`` a second, on the
    PostgreSQL database ``dsn`` (a table of its own is made there)."""
    asyncio.run(_table(dsn))
    port_file, ready_file = os.path.join(folder, "floor-worker-port"), os.path.join(folder, "floor-ready")
    for stale in (port_file, ready_file):
        if os.path.exists(stale):
            os.remove(stale)
    worker = subprocess.Popen([sys.executable, "-m", "bench.controlfloor", "--worker", port_file])
    scheduler = None
    try:
        port = int(_wait_file(port_file, worker))
        scheduler = subprocess.Popen([sys.executable, "-m", "bench.controlfloor", "--scheduler", "--dsn", dsn,
                                      "--worker-port", str(port), "--ready", ready_file])
        _wait_file(ready_file, scheduler)
        before = process_cpu(scheduler.pid)
        left = asyncio.run(_enqueue(dsn, jobs, rate))
        spent = process_cpu(scheduler.pid) - before
        if left:
            raise RuntimeError(f"the control floor's scheduler left {left} of {jobs} jobs undone")
        return ControlFloor(1000 * spent.total / jobs, rate, jobs)
    finally:
        for child in (scheduler, worker):
            if child is not None:
                child.kill()
                child.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", default="")
    p.add_argument("--jobs", type=int, default=600)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--worker", metavar="PORT_FILE", help=argparse.SUPPRESS)
    p.add_argument("--scheduler", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ready", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        _worker(a.worker)
        return 0
    if a.scheduler:
        _scheduler(a.dsn, a.worker_port, a.ready)
        return 0
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        floor = control_floor(a.dsn, a.jobs, a.rate, folder)
    print(f"bare scheduler: {floor.ms_per_job:.3f} ms CPU per job at {floor.rate:.0f} jobs/s ({floor.jobs} jobs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
