"""``make bench-cli``: what the ``dpip`` client achieves against a local system.

1. A 720p clip (``--seconds`` at 24 fps, made here from seeded synthetic frames, cached in
   bench-out/) is filtered by ``dpip video run`` through the real system (server + one worker
   per core), and, for comparison, by one local process doing decode -> grayscale -> encode with
   the same PyAV and Pillow: the work a user would otherwise script by hand.
2. ``dpip push`` of the same frames as PNG files with ``--jobs 1`` and ``--jobs 4``: upload rate.

    .venv/bin/python scripts/bench_cli.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

from cli import video
from harness.frames import frame_png
from harness.localsys import ROOT, LocalSystem, clean_env

CACHE = ROOT / "bench-out"
DPIP = str(Path(sys.executable).parent / "dpip")
FPS = 24


def ensure_clip(seconds: int) -> tuple[Path, Path]:
    """The clip and a directory of its frames as PNG files."""
    frames_dir = CACHE / f"clip-{seconds}s-frames"
    clip = CACHE / f"clip-{seconds}s.mp4"
    if not clip.exists():
        print(f"encoding a {seconds} s 720p clip into {clip} ...", flush=True)
        frames_dir.mkdir(parents=True, exist_ok=True)
        writer = video.Writer(clip, Fraction(FPS))
        for i in range(seconds * FPS):
            data = frame_png(i)
            (frames_dir / f"{i}.png").write_bytes(data)
            writer.write(data)
        writer.close()
    return clip, frames_dir


def local_baseline(clip: Path, out: Path) -> float:
    """One process, no DPIP: decode, grayscale, encode."""
    t0 = time.perf_counter()
    writer = video.Writer(out, video.probe(clip).fps)
    for image in video.frames(clip):
        writer.write(video.png(image.convert("L")))
    writer.close()
    return time.perf_counter() - t0


def dpip(env: dict[str, str], *args: str | Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([DPIP, *map(str, args), "--quiet"], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    clip, frames_dir = ensure_clip(args.seconds)
    n = args.seconds * FPS
    with tempfile.TemporaryDirectory(prefix="dpip-bench-cli-") as tmp:
        tmp_path = Path(tmp)
        base = local_baseline(clip, tmp_path / "local.mp4")
        system = LocalSystem(tmp_path / "data", log_dir=tmp_path / "logs")
        with system:  # stopped whatever happens; its logs printed if this fails
            system.start_server()
            names = {f"bench-{i}" for i in range(os.cpu_count() or 2)}
            for name in sorted(names):
                system.start_worker(name)
            system.wait_workers(names)
            env = clean_env(XDG_CONFIG_HOME=str(tmp_path / "config"), DPIP_URL=system.url,
                            DPIP_PASSWORD=system.admin_password)
            subprocess.run([DPIP, "login"], env=env, check=True, capture_output=True)
            run = dpip(env, "video", "run", clip, tmp_path / "out.mp4")
            push = {k: dpip(env, "push", frames_dir, "--jobs", str(k)) for k in (1, 4)}
    size_mb = sum(p.stat().st_size for p in frames_dir.iterdir()) / 1e6
    print(f"\nclip: {n} frames, 1280x720, {FPS} fps; workers: {len(names)}")
    print(f"local, one process (decode, grayscale, encode): {base:6.1f} s  {n / base:5.1f} frames/s")
    print(f"dpip video run through DPIP:                  {run:6.1f} s  {n / run:5.1f} frames/s"
          f"  (ratio to local {base / run:.2f})")
    for k, t in push.items():
        print(f"dpip push --jobs {k} ({n} PNGs, {size_mb:.0f} MB):        {t:6.1f} s  {n / t:5.1f} img/s"
              f"  {size_mb / t:5.1f} MB/s")
    print(f"push speed-up --jobs 4 over --jobs 1: {push[1] / push[4]:.2f}")


if __name__ == "__main__":
    main()
