"""``make bench-cluster``: past one machine, measured on this one.

720p frames pushed by 4 plain ``requests`` clients through

1. one server on the defaults (SQLite and files in its data dir), and
2. two servers on one PostgreSQL and one S3 store (SeaweedFS), the clients alternating between
   them, the workers heartbeating to both,

each with one worker per core, timed from the first upload until the workload is completed;
and the image bytes the servers relayed for jobs (``dpip_job_image_bytes`` in each server's
``/metrics``: originals sent to workers, results received from them), which an object store
should bring to about none. The control cost: tiny PNGs uploaded to the standby only, the
scheduling server's CPU per job and the standby's per upload, and beside it, at the same rate of
jobs, the floor under it (:mod:`bench.controlfloor`: a bare scheduler on the same PostgreSQL
doing per job only what no scheduling server can leave out). Then the takeover: the scheduling server is killed (-9) a few
times while a workload runs, and the time until the standby schedules is measured.

    .venv/bin/python scripts/bench_cluster.py [--frames 120] [--clients 4] [--takeovers 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.clients import requests_push, watch
from bench.controlfloor import control_floor
from bench.table import Row, table
from harness import refclient as ref
from harness.engines import EngineUnavailable, Postgres, SeaweedS3
from harness.frames import frame_png
from harness.localsys import ROOT, LocalSystem, wait_until
from harness.proccpu import process_cpu

CACHE = ROOT / "bench-out"
TABLE = CACHE / "bench-cluster-table.txt"
TAKEOVER_S = 5.0  # the bound: the standby schedules within 5 s of the leader's death
RELAYED_PER_IMAGE = 0.05  # job traffic through the servers with S3, as a share of the defaults'
CONTROL_MS_PER_JOB = 0.3  # the scheduling server's CPU per job, uploads sent to the standby (issue 33)


def say(line: str) -> None:
    print(line, flush=True)


def frames(n: int) -> list[bytes]:
    folder = CACHE / "frames-1280x720"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        f = folder / f"{i}.png"
        if not f.exists():
            f.write_bytes(frame_png(i, 1280, 720))
        out.append(f.read_bytes())
    return out


def job_bytes(system: LocalSystem) -> int:
    """Image bytes the server relayed for jobs, both ways, from its /metrics."""
    with urllib.request.urlopen(system.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("dpip_job_image_bytes{")))


def workers_for(cores: int) -> dict[str, tuple[str, ...]]:
    return {f"bench-{i}": ("--png-compress-level", "1") for i in range(cores)}


def run_defaults(tmp: Path, images: list[bytes], clients: int, cores: int) -> tuple[float, float]:
    """One server on SQLite and files: (img/s, relayed bytes per image)."""
    system = LocalSystem(tmp / "single" / "data", log_dir=tmp / "single" / "logs")
    with system:  # stopped whatever happens; their logs printed if this fails
        system.start_server()
        token = system.start_workers(workers_for(cores))
        requests_push(system.url, token, images[:4], clients)  # warm up
        before = job_bytes(system)
        pushed = requests_push(system.url, token, images, clients)
        return pushed.rate, (job_bytes(system) - before) / len(images)


def cluster(tmp: Path, pg: Postgres, s3: SeaweedS3, tag: str) -> tuple[LocalSystem, LocalSystem]:
    database, bucket = pg.new_database(tag), s3.new_bucket_name(tag)
    make = lambda name: LocalSystem(  # noqa: E731
        tmp / tag / name / "data", log_dir=tmp / tag / name / "logs",
        server_args=("--database", database, "--image-store", f"s3://{bucket}", "--server-name", name),
        server_env=s3.env())
    return make("a"), make("b")


def run_cluster(tmp: Path, pg: Postgres, s3: SeaweedS3, images: list[bytes], clients: int,
                cores: int) -> tuple[float, float]:
    """Two servers on PostgreSQL and S3: (img/s, relayed bytes per image, both servers)."""
    a, b = cluster(tmp, pg, s3, "cluster")
    with a, b:  # stopped whatever happens; their logs printed if this fails
        token = start_pair(a, b, workers_for(cores))
        requests_push([a.url, b.url], token, images[:4], clients)
        before = job_bytes(a) + job_bytes(b)
        pushed = requests_push([a.url, b.url], token, images, clients)
        return pushed.rate, (job_bytes(a) + job_bytes(b) - before) / len(images)


def start_pair(a: LocalSystem, b: LocalSystem, workers: dict[str, tuple[str, ...]]) -> str:
    """Both servers, and ``workers`` (name -> flags) heartbeating to both; a token once all live."""
    a.start_server()
    b.start_server()
    both = f"{a.controller},{b.controller}"
    for name, flags in workers.items():
        a.start_worker(name, "--controller", both, *flags)
    token = a.login()
    a.wait_workers(set(workers), token)
    return token


def leads(system: LocalSystem, token: str) -> bool:
    try:
        return bool(system.get("/status", token)["scheduler"]["leader"])
    except OSError:
        return False


def run_control_cost(tmp: Path, pg: Postgres, s3: SeaweedS3, n: int, clients: int,
                     cores: int) -> tuple[float, float, float]:
    """The control cost alone: ``n`` tiny PNGs uploaded to the standby only, the leader (which
    receives none of them) scheduling every job over the worker plane; (the leader's CPU ms per
    job, the standby's per upload, img/s). This bounds a fleet once uploads are spread over
    several API servers."""
    a, b = cluster(tmp, pg, s3, "control")
    with a, b:  # stopped whatever happens; their logs printed if this fails
        token = start_pair(a, b, workers_for(cores))
        wait_until(lambda: leads(a, token) or leads(b, token), 30, "a leader")
        leader, standby = (a, b) if leads(a, token) else (b, a)
        tiny = [frame_png(i, 64, 64) for i in range(n)]
        requests_push(standby.url, token, tiny[:50], clients)  # warm up (and the trust ramp)
        assert leader.server is not None and standby.server is not None
        lead0, stand0 = process_cpu(leader.server.pid), process_cpu(standby.server.pid)
        pushed = requests_push(standby.url, token, tiny, clients)
        lead = process_cpu(leader.server.pid) - lead0
        stand = process_cpu(standby.server.pid) - stand0
        return 1000 * lead.total / n, 1000 * stand.total / n, pushed.rate


def run_takeovers(tmp: Path, pg: Postgres, s3: SeaweedS3, n: int, cores: int) -> list[float]:
    """Kill -9 the leader mid-workload ``n`` times (it comes back as a standby each time):
    seconds until the other server schedules, polled every 20 ms; every image ends filtered."""
    a, b = cluster(tmp, pg, s3, "takeover")
    times: list[float] = []
    with a, b:  # stopped whatever happens; their logs printed if this fails
        token = start_pair(a, b, {name: ("--slow-rate", "1", "--slow-ms", "200") for name in workers_for(cores)})
        tiny = [frame_png(i, 64, 64) for i in range(30)]
        leader, standby = a, b
        for round_ in range(n):
            wid = ref.create_workload(standby.url, token)["workload_id"]
            for i, data in enumerate(tiny):
                assert ref.upload(standby.url, token, wid, f"{i}.png", data).status == 200
            wait_until(lambda: leader.get(f"/workloads/{wid}", token)["running_jobs"] > 0, 30, "jobs running")
            assert leader.server is not None
            leader.server.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            leader.server.wait()
            wait_until(lambda: leads(standby, token), 30, "the standby to lead", interval=0.02)
            times.append(time.monotonic() - t0)
            watch(standby.url, token, wid, len(tiny))
            view = standby.get(f"/workloads/{wid}", token)
            assert view["filtered_images"] == list(range(len(tiny))) and not view["failed_images"], view
            say(f"takeover {round_ + 1}: the standby scheduled {times[-1]:.2f} s after kill -9;"
                f" {len(tiny)}/{len(tiny)} images filtered")
            leader.start_server()  # back, as the standby
            leader, standby = standby, leader
        return times


def only_control(runs: int, tiny: int) -> int:
    """The control cost and its floor, ``runs`` times, each on a fresh pair of servers."""
    pg, s3 = Postgres(), SeaweedS3()
    with tempfile.TemporaryDirectory(prefix="dpip-bench-cluster-") as tmp:
        try:
            pg.setup()
            s3.setup()
            for n in range(runs):
                lead, stand, rate = run_control_cost(Path(tmp) / str(n), pg, s3, tiny, 8, os.cpu_count() or 1)
                floor = control_floor(pg.new_database(f"control-floor-{n}"), tiny, rate, tmp)
                say(f"control cost: the leader {lead:.2f} ms per job, the standby {stand:.2f} ms per upload,"
                    f" {rate:.0f} img/s; the floor {floor.ms_per_job:.2f} ms per job at the same rate")
        finally:
            s3.close()
            pg.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--takeovers", type=int, default=3)
    p.add_argument("--tiny", type=int, default=600, help="tiny PNGs for the control cost")
    p.add_argument("--only-control", type=int, default=0, metavar="N",
                   help="measure only the control cost and its floor, N times (e.g. to compare two"
                        " versions in alternating runs: PYTHONPATH=<a worktree> python -m bench.cluster ...)")
    a = p.parse_args()
    if a.only_control:
        return only_control(a.only_control, a.tiny)
    cores = os.cpu_count() or 1
    images = frames(a.frames)
    say(f"{len(images)} frames of 1280x720, {sum(map(len, images)) / len(images) / 1e6:.2f} MB each;"
        f" {cores} workers, {a.clients} requests clients")
    try:
        pg, s3 = Postgres(), SeaweedS3()
    except EngineUnavailable as e:
        say(f"bench-cluster needs PostgreSQL and SeaweedFS: {e}")
        return 1
    with tempfile.TemporaryDirectory(prefix="dpip-bench-cluster-") as tmp:
        try:
            pg.setup()
            s3.setup()
            one_rate, one_bytes = run_defaults(Path(tmp), images, a.clients, cores)
            say(f"one server, SQLite + files: {one_rate:.1f} img/s; job traffic through the server"
                f" {one_bytes / 1e6:.2f} MB per image")
            two_rate, two_bytes = run_cluster(Path(tmp), pg, s3, images, a.clients, cores)
            say(f"two servers, PostgreSQL + S3: {two_rate:.1f} img/s; job traffic through the servers"
                f" {two_bytes / 1e6:.3f} MB per image")
            control = run_control_cost(Path(tmp), pg, s3, a.tiny, 8, cores)
            say(f"the control cost: {a.tiny} tiny PNGs to the standby only, {cores} workers:"
                f" the leader's CPU {control[0]:.2f} ms per job (ceiling {1000 / control[0]:.0f} jobs/s per"
                f" scheduling core), the standby's {control[1]:.2f} ms per upload; {control[2]:.0f} img/s end to end")
            floor = control_floor(pg.new_database("control-floor"), a.tiny, control[2], tmp)
            say(f"the control floor: a bare scheduler (NOTIFY heard, job sent, reply read, one UPDATE) at the"
                f" same {floor.rate:.0f} jobs/s: {floor.ms_per_job:.2f} ms CPU per job")
            takeovers = run_takeovers(Path(tmp), pg, s3, a.takeovers, cores) if a.takeovers else []
        finally:
            s3.close()
            pg.close()
    rows = [
        Row("one server, SQLite + files: 720p img/s", one_rate, "img/s", None, True),
        Row("two servers, PostgreSQL + S3: 720p img/s", two_rate, "img/s", None, True,
            f"{two_rate / one_rate:.2f} of one server's"),
        Row("job image bytes through the servers, S3 / files", two_bytes / max(one_bytes, 1), "",
            RELAYED_PER_IMAGE, False, f"{two_bytes / 1e6:.3f} vs {one_bytes / 1e6:.2f} MB per image"),
        Row("the control cost: the scheduling server's CPU per job (uploads to the standby)", control[0], "ms",
            CONTROL_MS_PER_JOB, False, f"ceiling {1000 / control[0]:.0f} jobs/s per scheduling core; the standby"
            f" {control[1]:.2f} ms per upload; {control[2]:.0f} img/s"),
        Row("control floor: a bare scheduler's CPU per job at the same rate (same run)", floor.ms_per_job, "ms",
            None, False, f"{floor.ms_per_job:.2f} ms at {floor.rate:.0f} jobs/s; the <= {CONTROL_MS_PER_JOB:g} ms target"
            f" {'is under this floor' if floor.ms_per_job > CONTROL_MS_PER_JOB else 'is above it'}"),
    ]
    if takeovers:
        rows.append(Row("takeover after kill -9 of the leader, worst", max(takeovers), "s", TAKEOVER_S, False,
                        f"median {statistics.median(takeovers):.2f} s of {len(takeovers)}"))
    text = table(rows)
    print(f"\n{text}")
    CACHE.mkdir(exist_ok=True)
    TABLE.write_text(f"# make bench-cluster, {time.strftime('%Y-%m-%d %H:%M')}, {cores} cores\n{text}\n")
    print(f"(also in {TABLE.relative_to(ROOT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
