"""``make bench-scale``: one burst of work against a fixed single worker, a fixed pool of 3, and
``--autoscale 1:3``: how long the burst takes and how many worker-seconds each pays.

Every worker takes 300 ms per job (``--slow-rate 1 --slow-ms 300``) and runs 2 at once. The
burst is ``--images`` small PNGs pushed as fast as one client can. Worker-seconds are the
integral of live workers over a fixed window from the burst's start (``--window``), sampled
from /status: a fixed pool keeps paying after the burst, the autoscaled one retires its extra
workers after ``--idle-timeout``.

    .venv/bin/python scripts/bench_scale.py [--images 60] [--window 45] [--idle-timeout 10]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from harness import refclient as ref
from harness.frames import frame_png
from harness.localsys import LocalSystem, wait_until

SLOW = ("--slow-rate", "1", "--slow-ms", "300", "--capacity", "2")


def run(name: str, tmp: Path, images: list[bytes], window: float, server_args: tuple[str, ...],
        fixed: int) -> dict:
    system = LocalSystem(tmp / name / "data", log_dir=tmp / name / "logs", server_args=server_args)
    try:
        system.start_server()
        token = system.login()
        for i in range(fixed):
            system.start_worker(f"fixed-{i + 1}", *SLOW)
        resting = fixed or 1
        wait_until(lambda: sum(w["alive"] for w in ref.get_json(system.url, token, "/status")["workers"]) == resting,
                   60, f"{resting} worker(s) at rest")
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                status = ref.get_json(system.url, token, "/status")
                samples.append((time.monotonic(), sum(w["alive"] for w in status["workers"])))
                time.sleep(0.2)

        t0 = time.monotonic()
        sampler = threading.Thread(target=sample)
        sampler.start()
        wid = ref.create_workload(system.url, token)["workload_id"]
        for i, data in enumerate(images):
            assert ref.upload(system.url, token, wid, f"{i}.png", data).status == 200
        wait_until(lambda: ref.get_json(system.url, token, f"/workloads/{wid}")["status"] == "completed",
                   600, "the burst to complete", interval=0.05)
        done = time.monotonic() - t0
        time.sleep(max(0.0, window - (time.monotonic() - t0)))
        stop.set()
        sampler.join()
    finally:
        system.stop()
    seconds = sum((b[0] - a[0]) * a[1] for a, b in zip(samples, samples[1:]))
    return {"name": name, "completion": done, "worker_seconds": seconds, "peak": max(n for _, n in samples),
            "end": samples[-1][1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--window", type=float, default=45.0)
    ap.add_argument("--idle-timeout", type=float, default=10.0)
    a = ap.parse_args()
    images = [frame_png(i, 64, 48) for i in range(a.images)]
    scale = ("--autoscale", "1:3", "--idle-timeout", str(a.idle_timeout),
             "--autoscale-worker-args", " ".join(SLOW))
    with tempfile.TemporaryDirectory(prefix="dpip-bench-scale-") as tmp:
        results = [
            run("fixed 1 worker", Path(tmp), images, a.window, (), 1),
            run("fixed 3 workers", Path(tmp), images, a.window, (), 3),
            run("--autoscale 1:3", Path(tmp), images, a.window, scale, 0),
        ]
    print(f"\n{a.images} images x 300 ms, 2 slots per worker; worker-seconds over {a.window:.0f} s from the"
          f" burst's start (autoscale idle timeout {a.idle_timeout:g} s)")
    print(f"{'':18} {'completion':>11} {'worker-s':>9} {'peak':>5} {'at end':>7}")
    for r in results:
        print(f"{r['name']:18} {r['completion']:9.1f} s {r['worker_seconds']:9.1f} {r['peak']:5d} {r['end']:7d}")
    one, three, auto = results
    print(f"autoscale vs fixed 3: completion x{auto['completion'] / three['completion']:.2f},"
          f" worker-seconds x{auto['worker_seconds'] / three['worker_seconds']:.2f};"
          f" vs fixed 1: completion x{auto['completion'] / one['completion']:.2f}")


if __name__ == "__main__":
    main()
