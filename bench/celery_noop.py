"""The baseline ``make bench`` compares DPIP with: Celery 5 + Redis running no-op tasks on this
machine, in the same run (the per-image issue's "780 no-op tasks/s" was measured on another
machine on another day; only a ratio of one run means anything here).

``measure(tasks, clients)`` starts ``redis-server`` on a free loopback port and a Celery worker
with one process per core (prefork, as DPIP runs one worker per core), then sends ``tasks``
no-op tasks from ``clients`` threads, each waiting for its result, and one at a time for the
round trip. Celery and redis-server are not DPIP's dependencies: ``make bench`` installs them
(PyPI and Debian's ``redis-server``); without them this part is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from harness.localsys import free_port, wait_until

BROKER = os.environ.get("DPIP_BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/0")

try:
    from celery import Celery
except ImportError:  # make bench installs it; the module stays importable without it
    Celery = None  # type: ignore[assignment,misc]

app = Celery("dpip_bench", broker=BROKER, backend=BROKER) if Celery is not None else None
if app is not None:
    app.conf.update(task_acks_late=False, worker_prefetch_multiplier=4, result_expires=600,
                    broker_connection_retry_on_startup=True)

    @app.task(name="noop")
    def noop() -> None:
        """Nothing at all: what remains is Celery's own cost per task."""


@dataclass(frozen=True)
class CeleryFigures:
    rate: float  # no-op tasks/s, ``clients`` threads
    round_trip_ms: float  # p50, one task at a time


def missing() -> str | None:
    """Why the baseline cannot run here, or None."""
    if Celery is None:
        return "celery is not installed (make bench installs it)"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (make bench installs Debian's redis-server)"
    return None


def measure(tasks: int, clients: int, round_trips: int = 200) -> CeleryFigures:
    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    env = {**os.environ, "DPIP_BENCH_CELERY_BROKER": broker}
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="dpip-celery-") as tmp:
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        worker = None
        try:
            wait_until(lambda: _redis_up(port), 20, "redis-server to answer")
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "bench.celery_noop", "worker", "--loglevel", "WARNING",
                 "--concurrency", str(os.cpu_count() or 1), "--pool", "prefork", "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client = Celery("dpip_bench", broker=broker, backend=broker)
            client.conf.broker_connection_retry_on_startup = True
            task = client.signature("noop")
            wait_until(lambda: _answers(task), 60, "the Celery worker to answer")
            return CeleryFigures(_rate(task, tasks, clients), _round_trip(task, round_trips))
        finally:
            for proc in (worker, redis):
                if proc is not None:
                    proc.terminate()
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


def _redis_up(port: int) -> bool:
    import redis
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _answers(task) -> bool:
    try:
        task.apply_async().get(timeout=2)
        return True
    except Exception:  # noqa: BLE001 - not up yet, whatever the reason
        return False


def _rate(task, tasks: int, clients: int) -> float:
    """As DPIP's tiny run: ``clients`` threads send (each send waits for the broker, as an
    upload waits for its 200), then the clock runs until every result is back."""
    per_client = tasks // clients

    def client() -> list:
        return [task.apply_async() for _ in range(per_client)]

    with ThreadPoolExecutor(clients) as pool:
        t0 = time.perf_counter()
        for f in [pool.submit(client) for _ in range(clients)]:
            for result in f.result():
                result.get(timeout=120)
        return per_client * clients / (time.perf_counter() - t0)


def _round_trip(task, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        task.apply_async().get(timeout=60)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


if __name__ == "__main__":
    why = missing()
    if why:
        sys.exit(f"skipped: {why}")
    figures = measure(2000, 8)
    print(f"Celery + Redis no-op tasks, 8 threads: {figures.rate:.0f}/s; one at a time p50 {figures.round_trip_ms:.2f} ms")
