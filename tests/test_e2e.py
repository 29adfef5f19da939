"""End to end: the real server and two real workers, driven the way the reference's clients do."""

from __future__ import annotations

import io
import time

from PIL import Image, ImageFilter

from worker.telemetry import Telemetry

from tests.helpers import (
    ADMIN_PASSWORD,
    frame_png,
    job_rows,
    ref,
    wait_completed,
    wait_until,
)


def test_reference_clients_grayscale_round_trip(system, tmp_path):
    url = system.url
    token = ref.login(url, "admin", ADMIN_PASSWORD)
    workload = ref.create_workload(url, token)
    assert workload["filter"] == "grayscale" and workload["status"] == "scheduling"
    assert workload["running_jobs"] == 0 and workload["filtered_images"] == []
    wid = workload["workload_id"]

    frames = [frame_png(i, 320, 180) for i in range(20)]
    for i, data in enumerate(frames):
        r = ref.upload(url, token, wid, f"{i}.png", data, with_type=(i % 3 != 0))
        assert r.status == 200, r.body
        assert r.json() == {"workload_id": wid, "image_id": i, "type": "original"}

    final = wait_completed(url, token, wid)
    assert final["filtered_images"] == list(range(20))
    assert final["running_jobs"] == 0

    out = tmp_path / "pulled"
    out.mkdir()
    for i in range(20):
        r = ref.pull(url, token, wid, i)
        assert r.status == 200, r.body
        assert r.headers["content-type"] == "image/png"
        (out / f"{i}.png").write_bytes(r.body)
    for i in range(20):
        with Image.open(out / f"{i}.png") as got, Image.open(io.BytesIO(frames[i])) as src:
            assert got.format == "PNG" and got.size == src.size == (320, 180)
            assert got.mode == "L"
            assert got.tobytes() == src.convert("L").tobytes(), f"frame {i} is not its own grayscale"


def test_blur_workload_and_original_byte_identical(system):
    url = system.url
    token = ref.login(url, "admin", ADMIN_PASSWORD)
    r = ref.request(url, "POST", "/workloads", b'{"filter": "blur", "workload_name": "blurry"}',
                    {**ref.bearer(token), "Content-Type": "application/json"})
    assert r.status == 200, r.body
    wid = r.json()["workload_id"]
    assert r.json()["filter"] == "blur" and r.json()["workload_name"] == "blurry"
    frames = [frame_png(100 + i, 200, 120) for i in range(4)]
    for i, data in enumerate(frames):
        assert ref.upload(url, token, wid, f"{i}.png", data).status == 200
    wait_completed(url, token, wid)
    for i, data in enumerate(frames):
        original = ref.pull(url, token, wid, i, "original")
        assert original.status == 200 and original.body == data
        blurred = ref.pull(url, token, wid, i, "filtered")
        with Image.open(io.BytesIO(blurred.body)) as got, Image.open(io.BytesIO(data)) as src:
            assert got.size == src.size and got.format == "PNG"
            assert got.tobytes() == src.filter(ImageFilter.GaussianBlur(2)).tobytes()
    # The files are where the contract says: a directory per workload.
    assert (system.data_dir / "images" / "blurry" / "original" / "0.png").read_bytes() == frames[0]


def test_status_shows_live_workers_with_telemetry(system):
    url = system.url
    token = ref.login(url, "admin", ADMIN_PASSWORD)
    pending = ref.create_workload(url, token)  # no images yet: stays active
    status = ref.get_json(url, token, "/status")
    assert status["system_name"] and status["server_time"]
    assert pending["workload_id"] in {w["workload_id"] for w in status["active_workloads"]}
    workers = {w["name"]: w for w in status["workers"]}
    here = Telemetry().gpu()  # the workers run on this host
    assert {"w1", "w2"} <= set(workers)
    for w in workers.values():
        assert w["alive"] is True
        assert 0.0 <= w["cpu_percent"] <= 100.0
        assert 0.0 < w["memory_percent"] <= 100.0
        assert w["gpu"]["count"] == here.count  # what NVML reports on this host (0 without a GPU)
        assert isinstance(w["running_jobs"], int) and w["capacity"] >= 1
        assert isinstance(w["jobs_done"], int)
        assert time.time() - w["last_seen"] < 5
    assert workers["w1"]["tags"] == ["fast", "blue"]
    assert workers["w2"]["tags"] == []


def test_running_jobs_reported_while_work_is_in_flight(system):
    """Under load, the workload shows jobs running, then every image done."""
    url = system.url
    token = ref.login(url, "admin", ADMIN_PASSWORD)
    wid = ref.create_workload(url, token)["workload_id"]
    before = sum(w["jobs_done"] for w in ref.get_json(url, token, "/status")["workers"])
    data = frame_png(7, 1280, 720)
    for i in range(12):
        assert ref.upload(url, token, wid, f"{i}.png", data).status == 200
    seen = {"workload": False}

    def observe():
        w = ref.get_json(url, token, f"/workloads/{wid}")
        seen["workload"] |= w["running_jobs"] > 0 and w["status"] == "running"
        return w["status"] == "completed"

    wait_until(observe, 120, "the workload to complete", interval=0.05)
    assert seen["workload"], "never saw the workload running"
    assert ref.get_json(url, token, f"/workloads/{wid}")["filtered_images"] == list(range(12))
    wait_until(lambda: sum(w["jobs_done"] for w in ref.get_json(url, token, "/status")["workers"]) >= before + 12,
               10, "the workers to report the 12 jobs done")  # (their counts arrive with a heartbeat)


def test_tagged_workload_runs_on_a_worker_with_old_style_image_store_flags(system):
    """--image-store-endpoint overrides what the controller says; tags steer placement."""
    url = system.url
    token = ref.login(url, "admin", ADMIN_PASSWORD)
    system.start_worker("w3", "--tags", "special", "--image-store-endpoint", url)
    try:
        system.wait_workers({"w3"}, token)
        r = ref.request(url, "POST", "/workloads?tags=special", headers=ref.bearer(token))
        wid = r.json()["workload_id"]
        assert r.json()["tags"] == ["special"]
        for i in range(3):
            assert ref.upload(url, token, wid, f"{i}.png", frame_png(i, 64, 64)).status == 200
        assert wait_completed(url, token, wid)["filtered_images"] == [0, 1, 2]

        def w3_done():  # telemetry arrives with the next heartbeat
            w3 = next(w for w in ref.get_json(url, token, "/status")["workers"] if w["name"] == "w3")
            return w3["jobs_done"] == 3

        wait_until(w3_done, 10, "w3 to report 3 jobs done")
    finally:
        system.stop_worker("w3")


def test_a_job_that_keeps_failing_ends_visibly_failed(system):
    """A worker whose API token is wrong fails every attempt: the image ends failed, with why."""
    url = system.url
    token = ref.login(url, "admin", ADMIN_PASSWORD)
    system.start_worker("w4", "--tags", "broken", "--image-store-token", "not-a-valid-token")
    try:
        system.wait_workers({"w4"}, token)
        wid = ref.request(url, "POST", "/workloads?tags=broken", headers=ref.bearer(token)).json()["workload_id"]
        assert ref.upload(url, token, wid, "0.png", frame_png(0, 64, 64)).status == 200
        final = wait_completed(url, token, wid, timeout=60)
        assert final["filtered_images"] == []
        assert [f["image_id"] for f in final["failed_images"]] == [0]
        assert "401" in final["failed_images"][0]["reason"]
    finally:
        system.stop_worker("w4")


def test_the_e2e_script_passes(system):
    """scripts/e2e.sh (what `make e2e` runs) against the live system."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    env = {**os.environ, "DPIP_URL": system.url, "DPIP_PASSWORD": ADMIN_PASSWORD,
           "PYTHON": sys.executable, "E2E_FRAMES": "6"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "e2e.sh")], env=env,
                       capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "E2E PASS"


def test_a_corrupt_image_fails_once_with_its_reason_and_the_workload_completes(system):
    """Header fine (accepted), data truncated: the worker cannot decode it; no retry can help."""
    url = system.url
    token = ref.login(url, "admin", ADMIN_PASSWORD)
    wid = ref.create_workload(url, token)["workload_id"]
    good = frame_png(3, 120, 80)
    assert ref.upload(url, token, wid, "0.png", good[: len(good) // 2]).status == 200
    assert ref.upload(url, token, wid, "1.png", good).status == 200
    final = wait_completed(url, token, wid)
    assert final["filtered_images"] == [1]
    assert [f["image_id"] for f in final["failed_images"]] == [0]
    assert "cannot decode" in final["failed_images"][0]["reason"]
    # Failed for good once both workers said it cannot be decoded (one worker's word is not
    # enough: it may be broken, or lie), not after every attempt it is allowed: 2 attempts of
    # the 3 allowed can end a job only when two different workers refused it.
    states = {image: (state, attempts) for image, state, attempts, _ in job_rows(system, wid)}
    assert states[0] == ("failed", 2) and states[1][0] == "done"
