"""``make bench``: every performance target of the system, measured in one run, in one table.

1. Ceiling: a local ``multiprocessing.Pool`` (one process per core, spawn) does decode ->
   grayscale -> PNG encode (same zlib level as the workers) on 720p frames.
2. The real system (``main.py`` + one worker per core, as subprocesses) gets the same frames
   from 4 aiohttp clients, 4 plain ``requests`` clients and ``dpip push``; each is timed from the
   first upload to the workload completed, and compared with the pool.
3. Dispatch overhead, with 64x64 PNGs: throughput from 8 ``requests`` clients (and from the 4
   aiohttp ones), the server's own per-image latency, and a client's round trip, one at a time;
   the server's CPU per image (all its threads, from /proc) while the plain clients push, and
   per 720p frame against the workers' CPU for the same frames, with the file store and with an
   S3-compatible store (SeaweedFS, started for it).
4. Scaling: N workers whose jobs all take 100 ms longer (capacity 1), against linear (N * 10 img/s);
   a fresh system per N. Wide fleets: W workers of S slots with 1 s jobs (64 x 1, 32 x 8 and a
   1,024-slot 64 x 16), from a cold start, against linear (W * S img/s), with the server's CPU per
   image in the run.
5. TLS: the tiny and 720p pushes of the plain ``requests`` clients again, on two fresh systems
   one after the other, in clear and with HTTPS and mutual TLS on the worker plane.
6. History: ``GET /status`` and a page of ``GET /workloads`` with thousands of workloads.
7. The baseline: Celery 5 + Redis running no-op tasks on this machine in this run
   (``bench/celery_noop.py``), so that tiny images and the round trip are also compared with
   what it does here and now, not only with the issue's figures from another machine.

It ends with one table (figure | measured | target | verdict), also written to
bench-out/bench-table.txt.

    .venv/bin/python scripts/bench.py [--frames 200] [--clients 4] [--tiny 600] [--scale 16,64]
    quick: .venv/bin/python scripts/bench.py --frames 20 --tiny 100 --round-trips 50 --scale 16 --history 1000
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from PIL import Image, ImageFilter

from bench import celery_noop
from bench.clients import Push, aiohttp_push, cli_push, requests_push, round_trips
from bench.serverfloor import fill_seconds, lean_floor, round_trip_floor
from bench.table import Row, latencies_ms, percentile, table
from harness.engines import EngineError, EngineUnavailable, SeaweedS3
from harness.frames import frame_png
from harness.localsys import ROOT, LocalSystem
from harness.proccpu import CpuMeter

CACHE = ROOT / "bench-out"
TABLE = CACHE / "bench-table.txt"

# The targets.
TINY_RATE = 400.0  # img/s of tiny images on 2 cores, plain HTTP clients (issue 23; was 780, Celery's no-op rate elsewhere)
ROUND_TRIP_MS = 4.0  # p50, one image at a time
CELERY_ROUND_TRIP_MS = 1.7  # Celery's no-op round trip where the two targets above were set
POOL_RATIO = 0.85  # 720p: DPIP / local pool
HISTORY_MS = 20.0  # p50 of a GET, whatever the history
SERVER_MS_PER_TINY = 1.5  # the server's CPU per tiny image (all its threads), one image per request (issue 33)
SERVER_SHARE_720P = 0.06  # the server's CPU per 720p frame / the workers' (file store) (issue 33)
SERVER_SHARE_720P_S3 = 0.02  # the same with the images in an S3-compatible store
SLOW_MS = 100  # the scaling run's job time: every worker does 1000 / SLOW_MS img/s at most
IMAGES_PER_WORKER = 30  # the scaling run pushes this many images per worker


def linear_target(workers: int) -> float:
    """Fraction of linear scaling to reach: 0.9 up to 16 workers, 0.8 beyond (64)."""
    return 0.9 if workers <= 16 else 0.8


def say(line: str) -> None:
    print(line, flush=True)


# -- the local pool -----------------------------------------------------------------------------

def ensure_frames(n: int, width: int, height: int, pool: multiprocessing.pool.Pool) -> list[Path]:
    """Frames cached on disk between runs (generating 720p frames takes a while)."""
    folder = CACHE / f"frames-{width}x{height}"
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"{i}.png" for i in range(n)]
    missing = [i for i, f in enumerate(files) if not f.exists()]
    if missing:
        say(f"generating {len(missing)} {width}x{height} frames into {folder} ...")
        for i, data in zip(missing, pool.starmap(frame_png, [(i, width, height) for i in missing]), strict=True):
            files[i].write_bytes(data)
    return files


def gray_job(args: tuple[bytes, int]) -> int:
    data, level = args
    with Image.open(io.BytesIO(data)) as im:
        out = io.BytesIO()
        im.convert("L").save(out, "PNG", compress_level=level)
    return len(out.getvalue())


#: The 3-step pipeline measured against the same steps in a local pool.
PIPELINE = "resize(width=640)|sharpen|grayscale"


def pipeline_job(args: tuple[bytes, int]) -> int:
    """PIPELINE's steps written with Pillow directly: decode, resize, unsharp mask, gray, PNG."""
    data, level = args
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        small = im.resize((640, round(h * 640 / w)), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        small.filter(ImageFilter.UnsharpMask(2.0, 150, 3)).convert("L").save(out, "PNG", compress_level=level)
    return len(out.getvalue())


def bench_pool(pool: multiprocessing.pool.Pool, frames: list[bytes], level: int, job=gray_job) -> float:
    pool.map(job, [(frames[0], level)] * len(pool._pool))  # warm up every process
    t0 = time.perf_counter()
    pool.map(job, [(f, level) for f in frames], chunksize=1)
    return len(frames) / (time.perf_counter() - t0)


def measure_pool(n: int, level: int, cores: int) -> tuple[list[Path], float, float]:
    """The 720p frames' files and the local pool's rates on them (img/s): grayscale, PIPELINE."""
    ctx = multiprocessing.get_context("spawn")  # nng is not fork-safe; be consistent everywhere
    with ctx.Pool(cores) as pool:
        files = ensure_frames(n, 1280, 720, pool)
        frames = [f.read_bytes() for f in files]
        mb = sum(map(len, frames)) / len(frames) / 1e6
        say(f"{len(frames)} frames of 1280x720, {mb:.2f} MB each on average; {cores} cores")
        rate = bench_pool(pool, frames, level)
        piped = bench_pool(pool, frames, level, pipeline_job)
    say(f"local pool ({cores} processes, decode -> grayscale -> PNG level {level}): {rate:.1f} img/s")
    say(f"local pool, the same frames through {PIPELINE} (Pillow's own calls): {piped:.1f} img/s")
    return files, rate, piped


# -- the system ---------------------------------------------------------------------------------

@contextmanager
def running_system(folder: Path, workers: dict[str, tuple[str, ...]],
                   timeout: float = 30, tls: bool = False) -> Iterator[tuple[LocalSystem, str]]:
    """A server and ``workers`` (name -> flags), all alive; yields it and an admin token, then
    stops everything (printing the logs if something failed). With ``tls``: HTTPS and mutual TLS
    on the worker plane, certificates made in ``folder``."""
    system = LocalSystem(folder / "data", log_dir=folder / "logs", tls_dir=folder / "tls" if tls else None)
    try:
        system.start_server()
        yield system, system.start_many_workers(workers, timeout)
    except BaseException:
        print(system.logs())
        raise
    finally:
        system.stop()


def server_latency(system: LocalSystem, workload_id: str, images: int) -> tuple[float, float]:
    """p50 and p99 (ms) of a workload's per-image latency, upload accepted -> filtered stored."""
    lat = latencies_ms(system.data_dir / "dpip.sqlite3", workload_id)
    assert len(lat) == images, (len(lat), images)
    return statistics.median(lat), percentile(lat, 0.99)


def measure_720p(system: LocalSystem, token: str, files: list[Path], clients: int, pool_rate: float,
                 config_home: Path) -> list[Row]:
    """The frames pushed by aiohttp clients, by ``requests`` clients and by ``dpip push``."""
    frames = [f.read_bytes() for f in files]
    meter = meter_of(system).start()
    big = aiohttp_push(system.url, token, frames, clients)
    spent = meter.stop()
    p50, p99 = server_latency(system, big.workload_id, big.images)
    say(f"DPIP end to end ({len(system.workers)} workers, {clients} clients, upload -> filtered): "
        f"{big.rate:.1f} img/s in {big.elapsed:.1f}s; per-image latency p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    aio = Row(f"720p / local pool, {clients} aiohttp clients", big.rate / pool_rate, "", POOL_RATIO, True)
    say(f"ratio DPIP / local pool: {aio.value:.2f} ({aio.judgement})")
    share = Row("720p: server CPU / workers' CPU (file store)", spent.server.total / spent.workers.total, "",
                SERVER_SHARE_720P, False,
                f"{spent.per_image_ms(big.images):.1f} vs {1000 * spent.workers.total / big.images:.1f} ms per frame")
    say(f"720p CPU per frame: server {spent.per_image_ms(big.images):.1f} ms ({spent.breakdown(big.images)}),"
        f" workers {1000 * spent.workers.total / big.images:.1f} ms: ratio {share.value:.3f} ({share.judgement})")
    floor = floor_720p(system, big, frames, clients, 1000 * spent.workers.total / big.images)

    plain = requests_push(system.url, token, frames, clients)
    req = Row(f"720p / local pool, {clients} requests clients", plain.rate / pool_rate, "", POOL_RATIO, True)
    say(f"DPIP end to end, {clients} plain requests clients (a Session per thread): {plain.rate:.1f} img/s"
        f" in {plain.elapsed:.1f}s; ratio to local pool {req.value:.2f} ({req.judgement})")

    cli = cli_push(system.url, token, system.admin_password, files, clients, config_home)
    dpip = Row(f"720p / local pool, dpip push --jobs {clients}", cli.rate / pool_rate, "", POOL_RATIO, True)
    say(f"DPIP end to end, dpip push --jobs {clients} (its start included) until completed: {cli.rate:.1f} img/s"
        f" in {cli.elapsed:.1f}s; ratio to local pool {dpip.value:.2f} ({dpip.judgement})")
    return [req, aio, dpip, share, floor]


def floor_720p(system: LocalSystem, big: Push, frames: list[bytes], clients: int, workers_ms: float) -> Row:
    """The least a server on this stack (aiohttp on uvloop) spends per 720p frame, measured
    alone right after DPIP's run (:func:`bench.serverfloor.lean_floor`: the upload received,
    written durably and recorded in SQLite, sent to a worker, a result of the same size as
    DPIP's back, written and recorded,
    and the watcher's GETs of that run, answered from memory), over the same run's workers'
    CPU per frame: the floor under the 720p server-share row."""
    folder = system.data_dir / "images" / view_name(system, big.workload_id) / "filtered"
    sizes = [p.stat().st_size for p in folder.iterdir()]
    lean = lean_floor(frames, clients, round(statistics.mean(sizes)), big.images,
                      scratch=system.data_dir.parent / "lean-floor")  # (removed with the rest, at the end)
    per_frame = lean.upload_ms + lean.get_ms * big.polls / big.images
    row = Row("720p floor: lean server CPU / workers' CPU (same run)", per_frame / workers_ms, "", None, False,
              f"{per_frame:.1f} ms per frame; the <= {SERVER_SHARE_720P:g} target allows"
              f" {SERVER_SHARE_720P * workers_ms:.1f}")
    say(f"720p floor, bare aiohttp on uvloop, same frames: {lean.upload_ms:.2f} ms per upload ({lean.breakdown()})"
        f" + {big.polls / big.images:.2f} GETs per frame x {lean.get_ms:.2f} ms = {per_frame:.2f} ms per frame,"
        f" {row.value:.3f} of the workers' {workers_ms:.1f} ms: the target {SERVER_SHARE_720P:g} allows"
        f" {SERVER_SHARE_720P * workers_ms:.2f} ms")
    return row


def view_name(system: LocalSystem, workload_id: str) -> str:
    with sqlite3.connect(system.data_dir / "dpip.sqlite3") as db:
        return db.execute("SELECT dir FROM workloads WHERE id = ?", (workload_id,)).fetchone()[0]


def measure_pipeline(system: LocalSystem, token: str, files: list[Path], clients: int, pool_rate: float) -> Row:
    """PIPELINE on the 720p frames through DPIP (plain requests clients) against the same steps
    in the local pool: what three steps in one decode and one encode cost end to end."""
    frames = [f.read_bytes() for f in files]
    meter = meter_of(system).start()
    pushed = requests_push(system.url, token, frames, clients, PIPELINE)
    spent = meter.stop()
    row = Row(f"3-step pipeline ({PIPELINE}) / local pool, {clients} requests clients", pushed.rate / pool_rate, "",
              None, True, f"{pushed.rate:.1f} vs {pool_rate:.1f} img/s; server {spent.per_image_ms(pushed.images):.1f} ms,"
              f" workers {1000 * spent.workers.total / pushed.images:.1f} ms CPU per frame")
    say(f"720p through {PIPELINE}: DPIP {pushed.rate:.1f} img/s, local pool {pool_rate:.1f} img/s: ratio {row.value:.2f};"
        f" {row.detail}")
    return row


def measure_720p_s3(folder: Path, workers: dict[str, tuple[str, ...]], files: list[Path], clients: int) -> list[Row]:
    """The server's CPU per 720p frame over the workers' with the images in an S3-compatible
    store (SeaweedFS, started here): workers fetch originals and store results in the bucket
    themselves; the server still takes each client's upload and puts it there."""
    try:
        s3 = SeaweedS3()
        s3.setup()
    except (EngineUnavailable, EngineError) as e:
        say(f"720p on S3 skipped: no S3 server here ({e})")
        return []
    try:
        system = LocalSystem(folder / "data", log_dir=folder / "logs", server_env=s3.env(),
                             server_args=("--image-store", f"s3://{s3.new_bucket_name('bench')}"))
        with system:
            system.start_server()
            token = system.start_many_workers(workers)
            frames = [f.read_bytes() for f in files]
            requests_push(system.url, token, frames[:10], clients)  # the trust ramp
            meter = meter_of(system).start()
            pushed = requests_push(system.url, token, frames, clients)
            spent = meter.stop()
    finally:
        s3.close()
    share = Row("720p: server CPU / workers' CPU (S3 store)", spent.server.total / spent.workers.total, "",
                SERVER_SHARE_720P_S3, False,
                f"{spent.per_image_ms(pushed.images):.1f} vs {1000 * spent.workers.total / pushed.images:.1f} ms per frame")
    say(f"720p on S3, {clients} requests clients: {pushed.rate:.1f} img/s; CPU per frame: server"
        f" {spent.per_image_ms(pushed.images):.1f} ms ({spent.breakdown(pushed.images)}), workers"
        f" {1000 * spent.workers.total / pushed.images:.1f} ms: ratio {share.value:.3f} ({share.judgement})")
    return [share]


def meter_of(system: LocalSystem) -> CpuMeter:
    assert system.server is not None
    return CpuMeter(system.server.pid, [w.pid for w in system.workers.values()])


def measure_celery(tasks: int, clients: int, tiny: Row, round_trip: Row) -> list[Row]:
    """Celery + Redis no-op tasks here and now, and DPIP's tiny figures as fractions of them
    (the round trip against the issue's own proportion: 4 ms where Celery took 1.7 ms)."""
    why = celery_noop.missing()
    if why:
        say(f"Celery baseline skipped: {why}")
        return []
    celery = celery_noop.measure(tasks, clients)
    say(f"Celery 5 + Redis, no-op tasks, {clients} client threads: {celery.rate:.0f} tasks/s;"
        f" one at a time, round trip p50 {celery.round_trip_ms:.2f} ms")
    return [
        Row("tiny img/s / Celery no-op tasks/s (same run)", tiny.value / celery.rate, "", 1.0, True,
            f"{tiny.value:.0f} vs {celery.rate:.0f}/s"),
        Row("round trip p50 / Celery's (same run)", round_trip.value / celery.round_trip_ms, "",
            round(ROUND_TRIP_MS / CELERY_ROUND_TRIP_MS, 2), False,
            f"{round_trip.value:.1f} vs {celery.round_trip_ms:.1f} ms"),
    ]


def measure_tiny(system: LocalSystem, token: str, tiny: list[bytes], clients: int,
                 plain_clients: int) -> list[Row]:
    """Throughput on tiny images: ``clients`` aiohttp clients, then ``plain_clients`` requests
    ones, during which the server's CPU is metered (all its threads, from /proc)."""
    os.sync()  # the 720p runs' gigabytes go to disk now, not during this one (outside its meter)
    pushed = aiohttp_push(system.url, token, tiny, clients)
    p50, p99 = server_latency(system, pushed.workload_id, pushed.images)
    say(f"dispatch overhead: {len(tiny)} tiny 64x64 PNGs, {clients} clients: {pushed.rate:.1f} img/s; "
        f"latency upload accepted -> filtered stored p50 {p50:.1f} ms, p99 {p99:.1f} ms (queueing included)")
    os.sync()
    meter = meter_of(system).start()
    plain = requests_push(system.url, token, tiny, plain_clients)
    spent = meter.stop()
    workers = len(system.workers)
    row = Row(f"tiny, {plain_clients} plain HTTP clients, {workers} workers", plain.rate, "img/s", TINY_RATE, True)
    say(f"dispatch overhead: {len(tiny)} tiny 64x64 PNGs, {plain_clients} plain requests clients, {workers} workers:"
        f" {plain.rate:.1f} img/s ({row.judgement})")
    ms = spent.per_image_ms(len(tiny))
    cpu = Row("server CPU per tiny image (all its threads)", ms, "ms", SERVER_MS_PER_TINY, False,
              f"ceiling {1000 / ms:.0f} img/s per server core")
    say(f"server CPU per tiny image: {ms:.2f} ms ({spent.breakdown(len(tiny))}); one server core's ceiling"
        f" {1000 / ms:.0f} img/s ({cpu.judgement})")
    return [row, cpu]


def measure_round_trip(system: LocalSystem, token: str, tiny: list[bytes]) -> list[Row]:
    """One client: pushing back to back (server-side latency), then one image at a time."""
    lone = aiohttp_push(system.url, token, tiny, 1)
    p50, p99 = server_latency(system, lone.workload_id, lone.images)
    say(f"dispatch overhead: {len(tiny)} tiny 64x64 PNGs, 1 client: {lone.rate:.1f} img/s; "
        f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    wid, times = round_trips(system.url, token, tiny)
    server_p50, _ = server_latency(system, wid, len(tiny))
    row = Row("one at a time round trip p50 (1 client)", statistics.median(times), "ms", ROUND_TRIP_MS, False)
    say(f"one at a time: {len(tiny)} tiny PNGs, 1 requests client, upload -> id in filtered_images: round trip"
        f" p50 {row.value:.1f} ms, p99 {percentile(times, 0.99):.1f} ms ({row.judgement});"
        f" server side, upload stored -> filtered stored, p50 {server_p50:.1f} ms")
    return [row, floor_round_trip(system, tiny)]


def floor_round_trip(system: LocalSystem, tiny: list[bytes]) -> Row:
    """The least a round trip takes with the same client here and now
    (:func:`bench.serverfloor.round_trip_floor`: an upload a bare server stores, records, has
    a stand-in worker answer without filtering and records again before it answers, then one
    GET): the floor under the round-trip row."""
    times = round_trip_floor(tiny, scratch=system.data_dir.parent / "rt-floor")
    row = Row("round trip floor: upload + one GET to a bare server (same run)", statistics.median(times), "ms",
              None, False, f"the <= {ROUND_TRIP_MS:g} ms target is {'under' if statistics.median(times) > ROUND_TRIP_MS else 'over'}"
              " this floor")
    say(f"round trip floor, bare aiohttp on uvloop, the same requests client: p50 {row.value:.2f} ms,"
        f" p99 {percentile(times, 0.99):.2f} ms (upload stored durably, relayed to a stand-in worker and back,"
        f" recorded, answered; then one GET of a view)")
    return row


@contextmanager
def trusting(ca_file: str) -> Iterator[None]:
    """``requests`` clients (and the reference's) trust ``ca_file`` meanwhile."""
    saved = {k: os.environ.get(k) for k in ("REQUESTS_CA_BUNDLE", "DPIP_CA_FILE")}
    os.environ.update(REQUESTS_CA_BUNDLE=ca_file, DPIP_CA_FILE=ca_file)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tls_pushes(folder: Path, workers: dict[str, tuple[str, ...]], files: list[Path], tiny: list[bytes],
               clients: int, tiny_clients: int, tls: bool) -> tuple[float, float, float]:
    """On a fresh system (TLS everywhere, or none): tiny images from plain ``requests`` clients
    with the server's CPU metered, then the 720p frames. (img/s, server ms per tiny, 720p img/s)"""
    with running_system(folder, workers, tls=tls) as (system, token), \
            trusting(system.ca_file) if tls else nullcontext():
        requests_push(system.url, token, tiny[:100], tiny_clients)  # the trust ramp
        meter = meter_of(system).start()
        plain = requests_push(system.url, token, tiny, tiny_clients)
        spent = meter.stop()
        frames = requests_push(system.url, token, [f.read_bytes() for f in files], clients)
    return plain.rate, spent.per_image_ms(len(tiny)), frames.rate


def measure_tls(folder: Path, workers: dict[str, tuple[str, ...]], files: list[Path], tiny: list[bytes],
                clients: int, tiny_clients: int, pool_rate: float) -> list[Row]:
    """The same plain-``requests`` pushes on two fresh systems one after the other, in clear and
    with TLS everywhere (HTTPS, mutual TLS on the worker plane): what TLS costs, side by side."""
    clear = tls_pushes(folder / "clear", workers, files, tiny, clients, tiny_clients, tls=False)
    tls = tls_pushes(folder / "tls", workers, files, tiny, clients, tiny_clients, tls=True)
    rows = [
        Row(f"TLS on: tiny, {tiny_clients} plain HTTPS clients", tls[0], "img/s", None, True,
            f"in clear {clear[0]:.0f} img/s"),
        Row("TLS on: server CPU per tiny image", tls[1], "ms", None, False, f"in clear {clear[1]:.2f} ms"),
        Row(f"TLS on: 720p / local pool, {clients} requests clients", tls[2] / pool_rate, "", None, True,
            f"in clear {clear[2] / pool_rate:.2f}"),
    ]
    for row in rows:
        say(f"{row.figure}: {row.cells()[1]}")
    return rows


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
    times = []
    for _ in range(calls):
        req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req) as r:
            r.read()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure_history(system: LocalSystem, token: str, n: int) -> list[Row]:
    """``GET /status`` and pages of ``GET /workloads`` (first, middle) with ``n`` workloads."""
    with_history(system, n)
    rows = []
    for path in ("/status", "/workloads?limit=50", f"/workloads?limit=50&after=hist-{n // 2}"):
        row = Row(f"history ({n} workloads), GET {path} p50", call_p50_ms(system.url, token, path),
                  "ms", HISTORY_MS, False)
        say(f"history: {n} workloads of one user, GET {path}: p50 {row.value:.1f} ms ({row.judgement})")
        rows.append(row)
    return rows


def measure_scaling(folder: Path, workers: int, tiny: list[bytes], clients: int) -> Row:
    """A fresh system of ``workers`` one-slot workers, every job ``SLOW_MS`` slower; rate vs linear."""
    slow = ("--capacity", "1", "--slow-rate", "1", "--slow-ms", str(SLOW_MS))
    specs = {f"slow-{i}": slow for i in range(workers)}
    with running_system(folder, specs, timeout=60 + 3 * workers) as (system, token):
        push = requests_push(system.url, token, tiny, clients)
    linear = workers * 1000 / SLOW_MS
    row = Row(f"{workers} workers x {SLOW_MS} ms jobs, fraction of linear", push.rate / linear, "",
              linear_target(workers), True, f"{push.rate:.1f} of {linear:.0f} img/s")
    say(f"scaling: {workers} workers (capacity 1, {SLOW_MS} ms per job), {len(tiny)} tiny PNGs,"
        f" {clients} plain requests clients: {push.rate:.1f} img/s = {row.value:.2f} of linear"
        f" ({linear:.0f} img/s) ({row.judgement})")
    return row


FLEET_JOB_MS = 1000  # the wide-fleet runs' job time
FLEET_TARGETS = {1: 0.95, 8: 0.93}  # fraction of linear by slots per worker, from a cold start (issue 33)
FLEET_ROUNDS = 4  # the measured push gives every slot this many jobs


def measure_fleet(folder: Path, workers: int, slots: int, tiny: list[bytes], clients: int) -> list[Row]:
    """A fresh system of ``workers`` workers of ``slots`` slots each, every job 1 s, pushed
    ``FLEET_ROUNDS`` jobs per slot from a cold start (no warm-up: each newcomer's trusted slots
    ramp up within the run); rate vs linear, and the server's CPU per image in the run, which
    says how far one server core could go."""
    slow = ("--capacity", str(slots), "--slow-rate", "1", "--slow-ms", str(FLEET_JOB_MS))
    specs = {f"fleet-{i}": slow for i in range(workers)}
    total = workers * slots
    need = total * FLEET_ROUNDS
    with running_system(folder, specs, timeout=60 + 3 * workers) as (system, token):
        meter = meter_of(system).start()
        push = requests_push(system.url, token, (tiny * (need // len(tiny) + 1))[:need], clients)
        spent = meter.stop()
    linear = total * 1000 / FLEET_JOB_MS
    target = FLEET_TARGETS.get(slots) if total <= 256 else None
    ms = spent.per_image_ms(need)
    row = Row(f"{workers} workers x {slots} slots, 1 s jobs, fraction of linear", push.rate / linear, "",
              target, True, f"{push.rate:.1f} of {linear:.0f} img/s; server {ms:.1f} ms CPU per image")
    say(f"fleet: {workers} workers x {slots} slots, {FLEET_JOB_MS} ms per job, {need} tiny PNGs from a cold start,"
        f" {clients} plain requests clients: {push.rate:.1f} img/s = {row.value:.2f} of linear ({linear:.0f} img/s)"
        f" ({row.judgement if target else 'reported'}); server CPU {ms:.2f} ms per image"
        f" ({spent.breakdown(need)}): one server core's ceiling {1000 / ms:.0f} img/s")
    return [row] if target is None else [row, fleet_fill_floor(folder, total, tiny, clients, target)]


def fleet_fill_floor(folder: Path, slots: int, tiny: list[bytes], clients: int, target: float) -> Row:
    """The most a fleet of ``slots`` slots can reach with FLEET_ROUNDS jobs per slot from a cold
    start, given how fast the same clients get its first ``slots`` images to a bare server that
    only stores them (:func:`bench.serverfloor.fill_seconds`, measured here): no slot's first
    job starts before its image is in, so the run lasts at least FLEET_ROUNDS jobs plus that
    fill (one slot doing a job more would last a whole job more). The floor under a wide
    fleet's row."""
    fill = fill_seconds((tiny * (slots // len(tiny) + 1))[:slots], clients, scratch=folder / "fill-floor")
    rounds = FLEET_ROUNDS * FLEET_JOB_MS / 1000
    ceiling = rounds / (rounds + min(fill, FLEET_JOB_MS / 1000))
    row = Row(f"  its ceiling from {slots} uploads to a bare server (same run)", ceiling, "", None, True,
              f"those uploads took {1000 * fill:.0f} ms; the >= {target:g} target needs them in"
              f" {1000 * (rounds / target - rounds):.0f} ms")
    say(f"fleet fill floor: {slots} tiny PNGs from {clients} fresh requests sessions to a bare aiohttp server"
        f" (each stored and recorded durably, answered): {1000 * fill:.0f} ms, so {slots} slots x {FLEET_ROUNDS}"
        f" jobs of {FLEET_JOB_MS} ms end {1000 * fill:.0f} ms late at best: at most {ceiling:.3f} of linear"
        f" (the target {target:g} needs {1000 * (rounds / target - rounds):.0f} ms)")
    return row


def fleet_shapes(text: str) -> list[tuple[int, int]]:
    """``64x1,32x8`` -> [(64, 1), (32, 8)]."""
    shapes = []
    for item in text.split(","):
        if item.strip():
            w, _, s = item.strip().partition("x")
            shapes.append((int(w), int(s or 1)))
    return shapes


# -- the run ------------------------------------------------------------------------------------

def worker_counts(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n.strip()]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=200, help="720p frames")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients pushing 720p frames")
    p.add_argument("--level", type=int, default=1, help="PNG zlib level for pool and workers")
    p.add_argument("--tiny", type=int, default=600, help="64x64 images for the dispatch-overhead run")
    p.add_argument("--tiny-clients", type=int, default=8, help="requests threads pushing tiny images")
    p.add_argument("--round-trips", type=int, default=200, help="tiny images sent one at a time")
    p.add_argument("--scale", type=worker_counts, default=[16, 64], metavar="N,N",
                   help=f"worker counts for the scaling run ({IMAGES_PER_WORKER} images per worker; '' skips it)")
    p.add_argument("--fleets", type=fleet_shapes, default=[(64, 1), (32, 8), (64, 16)], metavar="WxS,...",
                   help="wide fleets with 1 s jobs: W workers of S slots ('' skips them)")
    p.add_argument("--history", type=int, default=10_000, help="workloads of one user for the history run")
    p.add_argument("--only-pipeline", action="store_true",
                   help=f"measure only {PIPELINE} against the local pool (make bench-pipeline)")
    return p.parse_args()


def main() -> int:
    a = parse_args()
    cores = os.cpu_count() or 1
    files, pool_rate, pipeline_rate = measure_pool(a.frames, a.level, cores)
    workers = {f"bench-{i}": ("--png-compress-level", str(a.level)) for i in range(cores)}
    if a.only_pipeline:
        with tempfile.TemporaryDirectory(prefix="dpip-bench-") as tmp, \
                running_system(Path(tmp) / "main", workers) as (system, token):
            requests_push(system.url, token, [f.read_bytes() for f in files[:10]], a.clients)  # the trust ramp
            print(f"\n{table([measure_pipeline(system, token, files, a.clients, pipeline_rate)])}")
        return 0
    count = max(a.tiny, a.round_trips, *(n * IMAGES_PER_WORKER for n in a.scale))
    tiny = [frame_png(i, 64, 64) for i in range(count)]
    with tempfile.TemporaryDirectory(prefix="dpip-bench-") as tmp:
        with running_system(Path(tmp) / "main", workers) as (system, token):
            big = measure_720p(system, token, files, a.clients, pool_rate, Path(tmp) / "config")
            big.append(measure_pipeline(system, token, files, a.clients, pipeline_rate))
            throughput, server_cpu = measure_tiny(system, token, tiny[:a.tiny], a.clients, a.tiny_clients)
            round_trip, rt_floor = measure_round_trip(system, token, tiny[:a.round_trips])
            history = measure_history(system, token, a.history)
        big += measure_720p_s3(Path(tmp) / "s3", workers, files, a.clients)
        tls = measure_tls(Path(tmp) / "tls", workers, files, tiny[:a.tiny], a.clients, a.tiny_clients, pool_rate)
        scaling = [measure_scaling(Path(tmp) / f"scale-{n}", n, tiny[:n * IMAGES_PER_WORKER], a.tiny_clients)
                   for n in a.scale]
        scaling += [row for w, s in a.fleets for row in measure_fleet(Path(tmp) / f"fleet-{w}x{s}", w, s, tiny, a.tiny_clients)]
    baseline = measure_celery(a.tiny * 4, a.tiny_clients, throughput, round_trip)
    text = table([server_cpu, throughput, round_trip, rt_floor, *baseline, *scaling, *big, *tls, *history])
    print(f"\n{text}")
    CACHE.mkdir(exist_ok=True)
    run = " ".join(sys.argv[1:]) or "defaults"
    TABLE.write_text(f"# make bench, {time.strftime('%Y-%m-%d %H:%M')}, {cores} cores, options: {run}\n{text}\n")
    print(f"(also in {TABLE.relative_to(ROOT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
