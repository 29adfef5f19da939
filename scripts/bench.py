"""``make bench``: end-to-end throughput of the real system against a local process pool.

1. A local ``multiprocessing.Pool`` (one process per core, spawn) does decode -> grayscale ->
   PNG encode (same zlib level as the workers) on the frames: the ceiling for this machine.
2. The real system (``main.py`` + one worker per core, as subprocesses) gets the same frames
   pushed over HTTP by a few concurrent clients; we time first upload -> workload completed.
3. Printed: both rates and their ratio, measured in this one run.

    .venv/bin/python scripts/bench.py [--frames 200] [--clients 4] [--level 1]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
from PIL import Image  # noqa: E402

from scripts.frames import frame_png  # noqa: E402
from scripts.localsys import ROOT, LocalSystem  # noqa: E402

CACHE = ROOT / "bench-out"


def ensure_frames(n: int, width: int, height: int, pool: multiprocessing.pool.Pool) -> list[bytes]:
    """Frames cached on disk between runs (generating 720p frames takes a while)."""
    folder = CACHE / f"frames-{width}x{height}"
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(n) if not (folder / f"{i}.png").exists()]
    if missing:
        print(f"generating {len(missing)} {width}x{height} frames into {folder} ...", flush=True)
        for i, data in zip(missing, pool.starmap(frame_png, [(i, width, height) for i in missing]), strict=True):
            (folder / f"{i}.png").write_bytes(data)
    return [(folder / f"{i}.png").read_bytes() for i in range(n)]


def gray_job(args: tuple[bytes, int]) -> int:
    data, level = args
    with Image.open(io.BytesIO(data)) as im:
        out = io.BytesIO()
        im.convert("L").save(out, "PNG", compress_level=level)
    return len(out.getvalue())


def bench_pool(pool: multiprocessing.pool.Pool, frames: list[bytes], level: int) -> float:
    pool.map(gray_job, [(frames[0], level)] * len(pool._pool))  # warm up every process
    t0 = time.perf_counter()
    pool.map(gray_job, [(f, level) for f in frames], chunksize=1)
    return len(frames) / (time.perf_counter() - t0)


def latencies_ms(db: Path, workload_id: str) -> list[float]:
    """Per image, original stored -> filtered stored, from the server's own timestamps."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT f.created_at - o.created_at FROM images o JOIN images f"
            " ON f.workload_id = o.workload_id AND f.image_id = o.image_id"
            " WHERE o.workload_id = ? AND o.type = 'original' AND f.type = 'filtered'",
            (workload_id,),
        ).fetchall()
    return sorted(r[0] * 1000 for r in rows)


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def push_and_wait(url: str, token: str, frames: list[bytes], clients: int,
                        filter_: str = "grayscale") -> tuple[str, float]:
    """Push every frame with ``clients`` concurrent uploaders; wait until all are filtered.

    Returns the workload id and the seconds from the first upload to the last result.
    """
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{url}/workloads", data={"filter": filter_}) as r:
            wid = (await r.json())["workload_id"]
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(frames)):
            queue.put_nowait(i)

        async def uploader() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                form = aiohttp.FormData()
                form.add_field("workload_id", wid)
                form.add_field("data", frames[i], filename=f"{i}.png")
                async with http.post(f"{url}/images", data=form) as r:
                    assert r.status == 200, await r.text()

        async def watcher() -> None:
            while True:
                async with http.get(f"{url}/workloads/{wid}") as r:
                    view = await r.json()
                if view["status"] == "completed" and view["images"] == len(frames):
                    assert not view["failed_images"], view["failed_images"]
                    return
                await asyncio.sleep(0.05)

        t0 = time.perf_counter()
        await asyncio.gather(*(uploader() for _ in range(clients)), watcher())
        return wid, time.perf_counter() - t0


def run_workload(system: LocalSystem, token: str, frames: list[bytes], clients: int) -> dict:
    wid, elapsed = asyncio.run(push_and_wait(system.url, token, frames, clients))
    lat = latencies_ms(system.data_dir / "dpip.sqlite3", wid)
    assert len(lat) == len(frames)
    return {"rate": len(frames) / elapsed, "elapsed": elapsed,
            "p50_ms": statistics.median(lat), "p99_ms": percentile(lat, 0.99)}


def with_history(system: LocalSystem, n: int) -> None:
    """Give the admin ``n`` finished workloads of one image each (written straight into the
    datastore: making them through the API would take minutes) and 5 active ones."""
    now = time.time() - n
    rows = [(f"hist-{i}", f"hist-{i}", f"hist-{i}", "admin", "grayscale", now + i, 1, 1 if i >= 5 else 0)
            for i in range(n)]
    with sqlite3.connect(system.data_dir / "dpip.sqlite3", timeout=30) as db:
        db.executemany("INSERT INTO workloads(id, name, dir, owner, filter, created_at, image_count,"
                       " filtered_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)


def call_p50_ms(url: str, token: str, path: str, calls: int = 50) -> float:
    """Median wall time of ``calls`` sequential GETs, one connection each (as curl does)."""
    import urllib.request

    times = []
    for _ in range(calls):
        req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req) as r:
            r.read()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--level", type=int, default=1, help="PNG zlib level for pool and workers")
    p.add_argument("--tiny", type=int, default=500, help="64x64 images for the dispatch-overhead run")
    p.add_argument("--history", type=int, default=10_000, help="workloads of one user for the history run")
    a = p.parse_args()
    cores = os.cpu_count() or 1
    ctx = multiprocessing.get_context("spawn")  # nng is not fork-safe; be consistent everywhere
    with ctx.Pool(cores) as pool:
        frames = ensure_frames(a.frames, 1280, 720, pool)
        mb = sum(map(len, frames)) / len(frames) / 1e6
        print(f"{len(frames)} frames of 1280x720, {mb:.2f} MB each on average; {cores} cores", flush=True)
        pool_rate = bench_pool(pool, frames, a.level)
    print(f"local pool ({cores} processes, decode -> grayscale -> PNG level {a.level}): "
          f"{pool_rate:.1f} img/s", flush=True)

    with tempfile.TemporaryDirectory(prefix="dpip-bench-") as tmp:
        system = LocalSystem(Path(tmp) / "data", log_dir=Path(tmp) / "logs")
        try:
            system.start_server()
            names = {f"bench-{i}" for i in range(cores)}
            for n in sorted(names):
                system.start_worker(n, "--png-compress-level", str(a.level))
            system.wait_workers(names)
            token = system.login()
            big = run_workload(system, token, frames, a.clients)
            tiny_frames = [frame_png(i, 64, 64) for i in range(a.tiny)]
            tiny = run_workload(system, token, tiny_frames, a.clients)
            lone = run_workload(system, token, tiny_frames[:200], 1)
            with_history(system, a.history)
            history = {path: call_p50_ms(system.url, token, path)
                       for path in ("/status", "/workloads?limit=50", "/workloads?limit=50&after=hist-5000")}
        except BaseException:
            print(system.logs())
            raise
        finally:
            system.stop()

    ratio = big["rate"] / pool_rate
    print(f"DPIP end to end ({cores} workers, {a.clients} clients, upload -> filtered): "
          f"{big['rate']:.1f} img/s in {big['elapsed']:.1f}s; "
          f"per-image latency p50 {big['p50_ms']:.0f} ms, p99 {big['p99_ms']:.0f} ms")
    print(f"ratio DPIP / local pool: {ratio:.2f}")
    print(f"dispatch overhead: {a.tiny} tiny 64x64 PNGs, {a.clients} clients: {tiny['rate']:.1f} img/s; "
          f"latency upload accepted -> filtered stored p50 {tiny['p50_ms']:.1f} ms, "
          f"p99 {tiny['p99_ms']:.1f} ms (queueing included)")
    print(f"dispatch overhead: 200 tiny 64x64 PNGs, 1 client: {lone['rate']:.1f} img/s; "
          f"latency p50 {lone['p50_ms']:.1f} ms, p99 {lone['p99_ms']:.1f} ms")
    for path, ms in history.items():
        verdict = "meets" if ms <= 20 else "MISSES"
        print(f"history: {a.history} workloads of one user, GET {path}: p50 {ms:.1f} ms"
              f" (target <= 20 ms: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
