"""The user's own data: deleting a workload, retention, quotas, photos the right way up with
their EXIF facts kept to their owner, validators on images, and a full disk. Real processes
(server and workers) where jobs run; the in-process app where only the API is involved."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import (
    ADMIN_PASSWORD,
    ROOT,
    unavailable,
    LocalSystem,
    assert_error,
    bearer,
    clean_env,
    completed_with,
    frame_png,
    login,
    new_workload,
    png_bytes,
    ref,
    upload,
    wait_until,
)


def photo_jpeg(width: int = 60, height: int = 40, orientation: int = 6) -> bytes:
    """A phone's portrait photo: stored landscape, EXIF says turn it; camera and GPS in EXIF."""
    im = Image.new("RGB", (width, height), (220, 30, 30))
    for x in range(width // 4):  # a dark band on the stored image's left: where is it after?
        for y in range(height):
            im.putpixel((x, y), (10, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F], exif[0x0110] = "Pear", "Phone 12"
    exif[0x8769] = {0x9003: "2026:07:14 09:30:00"}
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0), 3: "W", 4: (2.0, 21.0, 7.0)}
    out = io.BytesIO()
    im.save(out, "JPEG", exif=exif.tobytes(), quality=95)
    return out.getvalue()


def no_exif(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as im:
        return not im.getexif() and "exif" not in im.info


def make(tmp: Path, *args: str, **kw) -> LocalSystem:
    return LocalSystem(tmp / "data", log_dir=tmp / "logs", admin_password=ADMIN_PASSWORD, server_args=args, **kw)


def files_of(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def add_user(system: LocalSystem, name: str) -> str:
    """``main.py users add NAME`` as an operator runs it (password in DPIP_PASSWORD); its token."""
    subprocess.run([sys.executable, "main.py", "users", "--data-dir", str(system.data_dir), "add", name],
                   cwd=ROOT, env={**clean_env(), "DPIP_PASSWORD": f"{name}s-password"}, check=True,
                   capture_output=True)
    return wait_until(lambda: _login(system, name), 10, f"{name} to log in")


def _login(system: LocalSystem, name: str) -> str | None:
    try:
        return ref.login(system.url, name, f"{name}s-password")
    except AssertionError:
        return None  # not seen by the server yet


# -- delete ------------------------------------------------------------------------------------

def test_deleting_a_workload_cancels_its_jobs_and_removes_everything(tmp_path):
    system = make(tmp_path)
    with system:  # its logs are printed if this fails
        system.start_server()
        # The doomed workload's jobs would take two minutes each: only a cancel frees their slots
        # within the test's waits. The other workload runs on a worker of its own.
        token = system.start_workers({"slow": ("--capacity", "2", "--slow-rate", "1", "--slow-ms", "120000",
                                               "--tags", "slow"),
                                      "fast": ("--tags", "fast")})
        keep = ref.request(system.url, "POST", "/workloads?tags=fast", headers=ref.bearer(token)).json()["workload_id"]
        assert ref.upload(system.url, token, keep, "0.png", frame_png(0, 32, 32)).status == 200
        wid = ref.request(system.url, "POST", "/workloads?tags=slow", headers=ref.bearer(token)).json()["workload_id"]
        for i in range(6):
            assert ref.upload(system.url, token, wid, f"{i}.png", frame_png(i, 32, 32)).status == 200
        wait_until(lambda: system.get(f"/workloads/{wid}", token)["running_jobs"] > 0, 30, "jobs running")
        r = ref.request(system.url, "GET", f"/images/0?workload_id={wid}&size=small", headers=ref.bearer(token))
        assert r.status == 200  # a thumbnail exists too
        folder = system.data_dir / "images" / system.get(f"/workloads/{wid}", token)["workload_name"]
        assert files_of(folder)

        bob = add_user(system, "bob")
        r = ref.request(system.url, "DELETE", f"/workloads/{wid}", headers=ref.bearer(bob))
        assert r.status == 404, "someone else's workload is not there for them"

        r = ref.request(system.url, "DELETE", f"/workloads/{wid}", headers=ref.bearer(token))
        assert r.status == 200, r.body
        body = r.json()
        assert body["deleted"] and body["workload_id"] == wid and body["images"] == 6
        assert body["jobs"] == 6 and body["files"] == 7  # 6 originals and the thumbnail (no result yet)
        assert body["jobs_cancelled"] >= 1
        assert not folder.exists() or not files_of(folder)
        assert ref.request(system.url, "GET", f"/workloads/{wid}", headers=ref.bearer(token)).status == 404
        r = ref.request(system.url, "GET", f"/images/0?workload_id={wid}", headers=ref.bearer(token))
        assert r.status == 404
        assert ref.request(system.url, "DELETE", f"/workloads/{wid}", headers=ref.bearer(token)).status == 404
        # the running copies were cancelled (they had two minutes to go): the worker is free again
        wait_until(lambda: all(w["running_jobs"] == 0 for w in system.get("/status", token)["workers"]), 30,
                   "the slow worker's slots to be free")
        wait_until(lambda: completed_with(system, token, keep, 1), 30, "the other workload to finish")
        assert not folder.exists() or not files_of(folder), "no late result came back into it"


# -- retention and quotas ---------------------------------------------------------------------

def test_completed_workloads_older_than_the_retention_are_removed(tmp_path):
    system = make(tmp_path, "--retain-days", str(3 / 86400))  # three seconds
    with system:  # its logs are printed if this fails
        system.start_server()
        token = system.start_workers({"w": ()})
        done = ref.create_workload(system.url, token)["workload_id"]
        assert ref.upload(system.url, token, done, "0.png", frame_png(0, 32, 32)).status == 200
        active = ref.create_workload(system.url, token)["workload_id"]  # no image: never completed
        wait_until(lambda: ref.request(system.url, "GET", f"/workloads/{done}",
                                       headers=ref.bearer(token)).status == 404, 60, "the retention to remove it")
        assert system.get(f"/workloads/{active}", token)["workload_id"] == active, "not completed: kept"
        assert not files_of(system.data_dir / "images")


async def test_a_quota_is_a_clear_413_and_deleting_makes_room(aiohttp_client, settings):
    import dataclasses

    from server.services import build_app
    image = png_bytes(64, 48)
    client = await aiohttp_client(build_app(dataclasses.replace(settings, quota_bytes=3 * len(image) + 10)))
    token = await login(client)
    first = await new_workload(client, token)
    for _ in range(3):
        r = await upload(client, token, first["workload_id"], image)
        assert r.status == 200, await r.text()
    second = await new_workload(client, token)
    r = await upload(client, token, second["workload_id"], image)
    body = await assert_error(r, 413, "quota", str(3 * len(image) + 10))
    assert "delete" in body["error"]
    r = await client.delete(f"/workloads/{first['workload_id']}", headers=bearer(token))
    assert r.status == 200 and (await r.json())["bytes"] == 3 * len(image)
    r = await upload(client, token, second["workload_id"], image)
    assert r.status == 200, await r.text()


# -- photos -----------------------------------------------------------------------------------

def test_photos_come_out_upright_without_exif_and_their_facts_stay_with_their_owner(tmp_path):
    system = make(tmp_path)
    with system:  # its logs are printed if this fails
        system.start_server()
        token = system.start_workers({"w": ()})
        r = ref.request(system.url, "POST", "/workloads", b"filter=grayscale",
                        {**ref.bearer(token), "Content-Type": "application/x-www-form-urlencoded"})
        wid = r.json()["workload_id"]
        photo = photo_jpeg()
        assert ref.upload(system.url, token, wid, "IMG_0001.jpg", photo).status == 200
        wait_until(lambda: completed_with(system, token, wid, 1), 60, "the photo to be filtered")
        result = ref.request(system.url, "GET", f"/images/0?workload_id={wid}&type=filtered",
                             headers=ref.bearer(token))
        assert result.status == 200 and result.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(result.body)) as im:
            assert im.size == (40, 60), "upright: the portrait it is"
            assert im.mode == "L"
            # orientation 6 turns it a quarter clockwise: the stored left band is now on top
            assert im.getpixel((20, 3)) < 40 < im.getpixel((20, 50))
        assert no_exif(result.body), "no EXIF (no GPS position) in the result"
        thumb = ref.request(system.url, "GET", f"/images/0?workload_id={wid}&size=small", headers=ref.bearer(token))
        with Image.open(io.BytesIO(thumb.body)) as im:
            assert im.size[1] > im.size[0], "the thumbnail is upright too"
        assert no_exif(thumb.body)

        listing = ref.request(system.url, "GET", f"/images?workload_id={wid}", headers=ref.bearer(token)).json()
        original = next(i for i in listing if i["type"] == "original")
        assert original["filename"] == "IMG_0001.jpg" and (original["width"], original["height"]) == (40, 60)
        assert original["photo"] == {"camera": "Pear Phone 12", "taken_at": "2026-07-14T09:30:00",
                                     "gps": {"lat": 48.856667, "lon": -2.351944}}
        filtered = next(i for i in listing if i["type"] == "filtered")
        assert filtered["filename"] == "IMG_0001.jpg" and "photo" not in filtered

        eve = add_user(system, "eve")
        r = ref.request(system.url, "GET", f"/images?workload_id={wid}", headers=ref.bearer(eve))
        assert r.status == 404 and b"gps" not in r.body


# -- validators -------------------------------------------------------------------------------

def test_images_have_validators_and_a_304(tmp_path):
    system = make(tmp_path)
    with system:  # stopped whatever happens; its logs printed if this fails
        system.start_server()
        token = system.start_workers({"w": ()})
        wid = ref.create_workload(system.url, token)["workload_id"]
        assert ref.upload(system.url, token, wid, "0.png", frame_png(0, 32, 32)).status == 200
        wait_until(lambda: completed_with(system, token, wid, 1), 60, "done")
        for type_, cache in (("filtered", "immutable"), ("original", "no-cache")):
            path = f"/images/0?workload_id={wid}&type={type_}"
            r = ref.request(system.url, "GET", path, headers=ref.bearer(token))
            assert r.status == 200 and cache in r.headers["cache-control"]
            etag = r.headers["etag"]
            again = ref.request(system.url, "GET", path, headers={**ref.bearer(token), "If-None-Match": etag})
            assert again.status == 304 and again.body == b"" and again.headers["etag"] == etag
            other = ref.request(system.url, "GET", path, headers={**ref.bearer(token), "If-None-Match": '"x"'})
            assert other.status == 200 and other.body == r.body
        thumb = ref.request(system.url, "GET", f"/images/0?workload_id={wid}&size=small", headers=ref.bearer(token))
        assert thumb.headers["etag"] != etag, "a thumbnail is another representation"


# -- a full disk ------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB filesystem of our own (tmpfs), for the data dir; skipped where we cannot mount."""
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mount)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        unavailable(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_a_507_and_uploads_work_again_once_space_is_freed(tmp_path, small_disk):
    system = LocalSystem(small_disk / "data", log_dir=tmp_path / "logs", admin_password=ADMIN_PASSWORD)
    with system:  # its logs are printed if this fails
        system.start_server()
        token = system.start_workers({"w": ()})
        free = system.get("/status", token)["storage"]["images"]["free_bytes"]
        assert 0 < free <= 6 * 1024 * 1024
        wid = ref.create_workload(system.url, token)["workload_id"]
        accepted, statuses = 0, []
        big = frame_png(1, 480, 360)  # ~280 KB each
        for i in range(60):
            r = ref.upload(system.url, token, wid, f"{i}.png", big)
            statuses.append(r.status)
            if r.status == 200:
                accepted += 1
            else:
                assert r.status == 507, (r.status, r.body)
                assert "no space left" in r.json()["error"] and "request_id" not in r.json()
                if statuses[-3:] == [507] * 3:
                    break
        assert accepted >= 3 and statuses[-1] == 507
        assert not list((system.data_dir / "incoming").glob("*.upload")), "nothing half-written is left"
        assert system.get("/status", token)["storage"]["images"]["free_bytes"] < free
        metrics = ref.request(system.url, "GET", "/metrics").body.decode()
        assert any(line.startswith('dpip_free_bytes{store="images"}') for line in metrics.splitlines())
        # the last bytes taken too (the datastore's log cannot grow either): a delete still works
        with open(small_disk / "filler", "wb", buffering=0) as filler:
            try:
                while filler.write(b"\0" * 65536):
                    pass
            except OSError:
                pass  # full
        r = ref.request(system.url, "POST", "/workloads", headers=ref.bearer(token))
        # a 507 when the datastore's log has no room left either; it may still have some (the
        # log is reused after a checkpoint): then the workload is made. Never a 500.
        assert r.status in (200, 507), (r.status, r.body)
        assert r.status == 200 or "no space left" in r.json()["error"]
        r = ref.request(system.url, "DELETE", f"/workloads/{wid}", headers=ref.bearer(token))
        assert r.status == 200 and r.json()["images"] == accepted
        wid = ref.create_workload(system.url, token)["workload_id"]
        assert ref.upload(system.url, token, wid, "0.png", big).status == 200
        wait_until(lambda: completed_with(system, token, wid, 1), 60, "an image after the space was freed")
        log = (tmp_path / "logs" / "server.log").read_text()
        assert "Traceback" not in log


# -- a newcomer's first hour: what the server side says --------------------------------------

def test_a_worker_started_before_its_server_says_it_waits_then_joins(tmp_path):
    """What the user sees in the worker's terminal is the point here: a line saying it waits."""
    system = make(tmp_path)
    with system:  # stopped whatever happens; its logs printed if this fails
        system.start_worker("early")
        log = tmp_path / "logs" / "worker-early.log"
        wait_until(lambda: log.exists() and "still waiting for a welcome" in log.read_text(), 30,
                   "the worker to say it is waiting")
        assert system.controller in log.read_text(), "it names where it waits"
        system.start_server()
        system.wait_workers({"early"})


async def test_a_workload_short_of_its_announced_images_is_partial(client):
    token = await login(client)
    r = await client.post("/workloads", headers=bearer(token), data={"meta": '{"expected_images": 3}'})
    w = await r.json()
    assert w["partial"] is True
    for _ in range(3):
        assert (await upload(client, token, w["workload_id"], png_bytes())).status == 200
    view = await (await client.get(f"/workloads/{w['workload_id']}", headers=bearer(token))).json()
    assert view["partial"] is False and view["images"] == 3
    plain = await new_workload(client, token)
    assert plain["partial"] is False, "no announced count: never partial"
    r = await client.get("/login", headers={"Authorization": "Basic bm90OnJpZ2h0"})
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic"), "login takes Basic"
