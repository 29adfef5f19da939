"""``make bench-tail``: tail latency with one slow worker, under each policy (off, hedged, tied).

Three local workers, one of them ``--slow-rate 0.2 --slow-ms 2000``; 300 small images pushed at
a steady rate; per image, the latency from upload accepted to filtered stored (server-side
timestamps). Prints p50/p95/p99/max and the extra dispatches per policy, and draws the three
latency CDFs into a PNG (with Pillow: no plotting library needed).

    .venv/bin/python scripts/bench_tail.py [--images 300] [--rate 40] [--out docs/tail-latency.png]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageDraw  # noqa: E402

from scripts import refclient as ref  # noqa: E402
from scripts.bench import latencies_ms, percentile  # noqa: E402
from scripts.frames import frame_png  # noqa: E402
from scripts.localsys import ROOT, LocalSystem, wait_until  # noqa: E402

POLICIES = ("off", "hedged", "tied")
COLOURS = {"off": (214, 39, 40), "hedged": (31, 119, 180), "tied": (44, 160, 44)}


def run_policy(policy: str, frames: list[bytes], rate: float, tmp: Path) -> dict:
    system = LocalSystem(tmp / policy / "data", log_dir=tmp / policy / "logs",
                         server_args=("--hedge", policy))
    try:
        system.start_server()
        system.start_worker("fast-1")
        system.start_worker("fast-2")
        system.start_worker("slow", "--slow-rate", "0.2", "--slow-ms", "2000")
        token = system.login()
        system.wait_workers({"fast-1", "fast-2", "slow"}, token)
        wid = ref.create_workload(system.url, token)["workload_id"]
        t0 = time.monotonic()
        for i, data in enumerate(frames):
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))  # a steady arrival rate
            assert ref.upload(system.url, token, wid, f"{i}.png", data).status == 200
        wait_until(lambda: ref.get_json(system.url, token, f"/workloads/{wid}")["status"] == "completed",
                   300, f"the {policy} workload")
        jobs = ref.get_json(system.url, token, f"/workloads/{wid}/jobs")
        stats = ref.get_json(system.url, token, "/status")["scheduler"]
        lat = latencies_ms(system.data_dir / "dpip.sqlite3", wid)
        n = len(frames)
        assert len(lat) == n, f"{policy}: {len(lat)} of {n} images filtered"
        return {
            "latencies": lat,
            "p50": percentile(lat, 0.50), "p95": percentile(lat, 0.95),
            "p99": percentile(lat, 0.99), "max": lat[-1],
            "extra_dispatches": 100.0 * (sum(j["copies"] for j in jobs) - n) / n,
            "extra_work": 100.0 * (stats["copies_started"] - stats["jobs_done"]) / max(1, stats["jobs_done"]),
        }
    except BaseException:
        print(system.logs())
        raise
    finally:
        system.stop()


def draw_cdfs(results: dict[str, dict], out: Path) -> None:
    """Latency CDFs on a log-scale x axis, one line per policy."""
    w, h, left, right, top, bottom = 900, 520, 80, 30, 40, 70
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    lo = 10 ** math.floor(math.log10(max(1.0, min(r["latencies"][0] for r in results.values()))))
    hi = 10 ** math.ceil(math.log10(max(r["max"] for r in results.values())))

    def x(ms: float) -> float:
        return left + (math.log10(max(ms, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (w - left - right)

    def y(q: float) -> float:
        # A tail-stretching scale: 0.9, 0.99 and 0.999 are equally spaced, so the tail shows.
        depth = -math.log10(max(1.0 - q, 1e-3)) / 3.0
        return h - bottom - depth * (h - top - bottom)

    d.rectangle((left, top, w - right, h - bottom), outline="black")
    decade = lo
    while decade <= hi:
        for m in (1, 2, 5):
            v = decade * m
            if lo <= v <= hi:
                d.line((x(v), top, x(v), h - bottom), fill=(225, 225, 225))
                d.text((x(v) - 12, h - bottom + 6), f"{v:g}", fill="black")
        decade *= 10
    for q in (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999):
        d.line((left, y(q), w - right, y(q)), fill=(225, 225, 225))
        d.text((left - 45, y(q) - 6), f"{q:g}", fill="black")
    for policy, r in results.items():
        lat = r["latencies"]
        pts = [(x(v), y(i / len(lat))) for i, v in enumerate(lat)]
        d.line(pts, fill=COLOURS[policy], width=3)
    d.text((w / 2 - 150, h - 35), "latency, upload accepted -> filtered stored (ms, log scale)", fill="black")
    d.text((left, 12), "DPIP tail latency: 3 workers, one slow 20% of the time by 2 s."
           "  y: fraction of images done (tail-stretched scale)", fill="black")
    for k, (policy, r) in enumerate(results.items()):
        ly = top + 15 + 18 * k
        d.line((w - 260, ly + 6, w - 230, ly + 6), fill=COLOURS[policy], width=3)
        d.text((w - 222, ly), f"{policy}: p99 {r['p99']:.0f} ms", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--rate", type=float, default=40.0, help="uploads per second")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "tail-latency.png")
    a = p.parse_args()
    frames = [frame_png(i, 128, 96) for i in range(a.images)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="dpip-tail-") as tmp:
        for policy in POLICIES:
            results[policy] = run_policy(policy, frames, a.rate, Path(tmp))
            r = results[policy]
            print(f"{policy:>7}: p50 {r['p50']:7.1f} ms  p95 {r['p95']:7.1f} ms  p99 {r['p99']:7.1f} ms"
                  f"  max {r['max']:7.1f} ms  extra dispatches {r['extra_dispatches']:5.1f}%"
                  f"  extra work {r['extra_work']:5.1f}%", flush=True)
    off = results["off"]["p99"]
    for policy in ("hedged", "tied"):
        print(f"{policy}: p99 is {results[policy]['p99'] / off:.3f} of off's "
              f"({'meets' if results[policy]['p99'] <= off / 5 else 'misses'} the 1/5 target)")
    draw_cdfs(results, a.out)
    print(f"chart: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
