"""Where the server's CPU goes per tiny image: py-spy over the server while plain HTTP clients
push tiny PNGs through two workers, folded into the functions that cost the most.

    .venv/bin/python -m bench.profile [--tiny 1200] [--clients 8] [--out /tmp/dpip-profile]

Prints the server's CPU per image (all threads, /proc) and, from py-spy's samples (all threads,
idle ones left out), the share of samples by top-level activity and by function (inclusive).
Needs ``py-spy`` (``make bench-deps``) and the right to read another process (root here).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.clients import requests_push
from harness.frames import frame_png
from harness.localsys import LocalSystem
from harness.proccpu import CpuMeter


def _per_thread(pid: int) -> dict[str, tuple[float, float]]:
    """Each live thread's (user, kernel) CPU seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[task.name] = (int(fields[11]) / tick, int(fields[12]) / tick)
    return out


def fold(raw: Path, top: int, only: str = "") -> str:
    """The collapsed stacks py-spy wrote, as a table of the costliest functions (inclusive);
    ``only``: the stacks that pass through a frame containing this text (e.g. the event loop's
    ``main.py``)."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if only and only not in line:
            continue
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].rstrip(")") for f in stack.split(";")[1:]]
        total += n
        for f in set(frames):
            inclusive[f] += n
        if frames:
            own[frames[-1]] += n
    lines = [f"{total} samples (non-idle)", "inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    lines += ["self:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", type=int, default=1200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--top", type=int, default=45)
    p.add_argument("--out", default="/tmp/dpip-profile")
    p.add_argument("--server-args", default="", help="extra server flags, e.g. '--no-fsync'")
    p.add_argument("--native", action="store_true",
                   help="C frames too (uvloop, libc; py-spy then pauses the server to sample it)")
    p.add_argument("--no-spy", action="store_true", help="only the CPU figures (py-spy costs the server some)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--only", default="", help="fold only the stacks through this text (main.py: the event loop)")
    p.add_argument("--frames", default="", help="a directory of images to push instead of tiny PNGs"
                                                " (e.g. bench-out/frames-1280x720, made by make bench)")
    p.add_argument("--worker-args", default="", help="e.g. '--capacity 8 --slow-rate 1 --slow-ms 1000'")
    a = p.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.frames:
        files = sorted(Path(a.frames).iterdir())
        tiny = [files[i % len(files)].read_bytes() for i in range(a.tiny)]
    else:
        tiny = [frame_png(i, 64, 64) for i in range(a.tiny)]
    with tempfile.TemporaryDirectory() as tmp, LocalSystem(Path(tmp), server_args=tuple(a.server_args.split())) as system:
        system.start_server()
        specs = {f"w{i}": tuple(a.worker_args.split()) for i in range(a.workers)}
        token = system.start_many_workers(specs, timeout=60 + 3 * a.workers)
        requests_push(system.url, token, tiny[:min(200, a.tiny // 4)], a.clients)  # warm up (and the trust ramp)
        assert system.server is not None
        raw = out / "server.txt"
        recorder = subprocess.Popen(["true"]) if a.no_spy else subprocess.Popen([spy, "record", "--pid", str(system.server.pid), "--rate", "250",
                                     "--threads", "--format", "raw", "--output", str(raw)] + (["--native"] if a.native else ["--nonblocking"]),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tids0 = _per_thread(system.server.pid)
        meter = CpuMeter(system.server.pid, [p.pid for p in system.workers.values()]).start()
        push = requests_push(system.url, token, tiny, a.clients)
        spent = meter.stop()
        tids1 = _per_thread(system.server.pid)
        names = subprocess.run([spy, "dump", "--pid", str(system.server.pid)], capture_output=True, text=True).stdout
        recorder.send_signal(signal.SIGINT)
        recorder.wait(30)
        plane = system.get("/status", token).get("worker_plane")
    print(f"{a.tiny} tiny images, {a.clients} clients: {push.rate:.0f} img/s; server CPU"
          f" {spent.per_image_ms(a.tiny):.2f} ms per image ({spent.breakdown(a.tiny)}); workers"
          f" {1000 * spent.workers.total / a.tiny:.2f} ms per image")
    print(f"worker plane: {plane}")
    for tid, (u, k) in sorted(tids1.items(), key=lambda kv: -(kv[1][0] + kv[1][1] - sum(tids0.get(kv[0], (0, 0)))))[:8]:
        u0, k0 = tids0.get(tid, (0, 0))
        label = next((line for line in names.splitlines() if f"{tid}" in line), "?")
        print(f"  thread {tid}: user {1000 * (u - u0) / a.tiny:.2f} kernel {1000 * (k - k0) / a.tiny:.2f} ms/image  {label[:90]}")
    if raw.exists():
        print(fold(raw, a.top, a.only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
