"""What a hostile review found (issue 21), each reproduced the way it was attacked and held at the
point where the race happens: a photo deleted while its thumbnail was being made, a job longer
than the RPC socket's default timeout, progressive JPEG decode bombs, one user's thumbnails in
front of another's, results carrying metadata, the quota raced by concurrent uploads, errors that
were not clear JSON."""

from __future__ import annotations

import asyncio
import io
import threading

import pytest
from PIL import Image

from api.keys import AUTH, IMAGES, SCHEDULER, STORE
from storage import thumbnails as image_module
from tests.helpers import (
    assert_error,
    bearer,
    frame_png,
    job_rows,
    login,
    new_workload,
    png_bytes,
    push,
    ref,
    slow,
    upload,
    wait_completed,
    workload,
)


def _thumbnail_gate(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Holds every thumbnail being made until the test lets it go: (started, release)."""
    started, release = threading.Event(), threading.Event()
    real = image_module.make_thumbnail

    def held(source: bytes, px: int, fmt: str) -> bytes:
        started.set()
        release.wait(30)
        return real(source, px, fmt)

    monkeypatch.setattr(image_module, "make_thumbnail", held)
    return started, release


def _files_under(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def test_a_thumbnail_finished_after_its_delete_is_never_written_nor_served_to_another_user(
        client, monkeypatch):
    """Alice's thumbnail finishes after she deleted the workload; Bob then makes a workload of
    the same name and asks for the thumbnail of his own image 0: he gets his picture, and
    nothing of Alice's is left on disk."""
    app = client.app
    alice = await login(client)
    await app[AUTH].add_user("bob", "bobpw")
    bob = await login(client, "bob", "bobpw")
    mine = await new_workload(client, alice, workload_name="holiday")
    r = await upload(client, alice, mine["workload_id"], png_bytes(900, 700, (250, 0, 0)))
    assert r.status == 200, await r.text()
    started, release = _thumbnail_gate(monkeypatch)
    thumb = asyncio.ensure_future(client.get("/images/0", headers=bearer(alice), params={
        "workload_id": mine["workload_id"], "size": "large"}))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
    r = await client.delete(f"/workloads/{mine['workload_id']}", headers=bearer(alice))
    assert r.status == 200, await r.text()
    release.set()
    await assert_error(await thumb, 404, "deleted")
    images_root = app[IMAGES].root
    assert _files_under(images_root) == [], "nothing of a deleted workload is written after its delete"

    his = await new_workload(client, bob, workload_name="holiday")
    r = await upload(client, bob, his["workload_id"], png_bytes(64, 64, (0, 0, 250)))
    assert r.status == 200, await r.text()
    r = await client.get("/images/0", headers=bearer(bob), params={"workload_id": his["workload_id"],
                                                                    "size": "large"})
    assert r.status == 200, await r.text()
    with Image.open(io.BytesIO(await r.read())) as got:
        assert got.size == (64, 64) and got.convert("RGB").getpixel((10, 10)) == (0, 0, 250)
    bob_dir = (await app[STORE].get_workload(his["workload_id"])).dir
    assert bob_dir != "holiday", "a deleted workload's directory is never given to another"
    assert all(f.startswith(bob_dir + "/") for f in _files_under(images_root))


@pytest.mark.parametrize("size", ["in memory", "streamed to a file"])
async def test_an_upload_that_loses_to_a_delete_leaves_no_file(client, monkeypatch, size):
    """The original was received; its workload is deleted (rows, then files) before the file is
    placed: the upload is a 404 and no file of it stays behind. A small one is placed with its
    row, in one trip (the datastore's write_queued: its job was sent meanwhile, and is dropped);
    one over KEEP_BYTES was streamed to a temporary file and is moved into place first (the
    image store's commit)."""
    import os

    from storage.images import KEEP_BYTES

    app = client.app
    token = await login(client)
    w = await new_workload(client, token)
    images = app[IMAGES]
    received, release = asyncio.Event(), asyncio.Event()
    if size == "in memory":
        data = png_bytes(32, 32)
        owner, name = app[STORE], "write_queued"
    else:
        side = 1200
        data = _png_of(Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)))
        assert len(data) > KEEP_BYTES
        owner, name = images, "commit"
    real = getattr(owner, name)

    async def held(*args, **kwargs):
        received.set()
        await release.wait()
        return await real(*args, **kwargs)

    if size == "in memory":  # (put in line at once: a future)
        monkeypatch.setattr(owner, name, lambda *args, **kwargs: asyncio.ensure_future(held(*args, **kwargs)))
    else:
        monkeypatch.setattr(owner, name, held)
    body, ctype = ref.multipart({"workload_id": w["workload_id"]}, "data", "17.png", data)
    pending = asyncio.ensure_future(client.post("/images", data=io.BytesIO(body),
                                                headers={**bearer(token), "Content-Type": ctype}))
    await asyncio.wait([pending, asyncio.ensure_future(received.wait())], timeout=30,
                       return_when=asyncio.FIRST_COMPLETED)
    assert received.is_set(), pending.done() and await pending.result().text()
    r = await client.delete(f"/workloads/{w['workload_id']}", headers=bearer(token))
    assert r.status == 200, await r.text()
    release.set()
    await assert_error(await pending, 404, "not found")
    assert _files_under(images.root) == []
    assert app[SCHEDULER].queued() == 0  # (a job sent as its upload was being committed: gone too)


def _png_of(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, "PNG", compress_level=1)
    return out.getvalue()


# -- a job longer than the RPC socket's default timeout -----------------------------------

def test_a_job_longer_than_the_rpc_default_completes_and_a_timeout_says_its_real_limit(make_system):
    """A worker that takes 4 s per job (the welcome's RPC client has a 3 s default): with the
    default --job-timeout (120 s) its jobs complete on their first attempt; with --job-timeout
    2 they fail saying 2 s, not something else."""
    system = make_system()
    token = system.start_workers({"slow": slow(4000)})
    wid = workload(system.url, token)
    push(system, token, wid, {0: frame_png(0, 32, 32)})
    wait_completed(system.url, token, wid, timeout=60)
    assert [(r[0], r[1], r[2]) for r in job_rows(system, wid)] == [(0, "done", 1)]

    strict = make_system("--job-timeout", "2", "--max-attempts", "1")
    token = strict.start_workers({"slow": slow(4000)})
    wid = workload(strict.url, token)
    push(strict, token, wid, {0: frame_png(0, 32, 32)})
    done = wait_completed(strict.url, token, wid, timeout=60)
    assert [f["image_id"] for f in done["failed_images"]] == [0]
    assert "no reply within 2.0s" in done["failed_images"][0]["reason"], done


# -- progressive JPEG bombs, and one user's thumbnails in front of another's -----------------

def progressive_jpeg(scans_added: int = 0, size=(64, 48)) -> bytes:
    """A progressive JPEG, with its last scan repeated ``scans_added`` more times (each costs a
    decoding pass: the reviewer's 94 KB file had 1000)."""
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 80, 40)).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    scan = data[last:-2]  # up to the end-of-image marker
    return data[:-2] + scan * scans_added + data[-2:]


async def test_a_jpeg_of_a_thousand_scans_is_refused_at_upload_and_an_ordinary_progressive_one_is_not(client):
    token = await login(client)
    w = await new_workload(client, token)
    bomb = progressive_jpeg(1000)
    assert len(bomb) < 200_000
    await assert_error(await upload(client, token, w["workload_id"], bomb), 400, "scans")
    r = await upload(client, token, w["workload_id"], progressive_jpeg())
    assert r.status == 200, await r.text()
    big = progressive_jpeg(1000, size=(600, 400)) + b"\0" * 300_000  # streamed to a file, not in memory
    await assert_error(await upload(client, token, w["workload_id"], big), 400, "scans")
    assert _files_under(client.app[IMAGES].root) == [f"{(await client.app[STORE].get_workload(w['workload_id'])).dir}/original/0.jpg"]


async def test_one_users_slow_thumbnails_never_hold_another_users(client, monkeypatch):
    """Alice asks for three thumbnails that take forever (held here); Bob's comes back
    meanwhile: a user's thumbnails take one of the two thumbnail threads at most."""
    app = client.app
    alice = await login(client)
    await app[AUTH].add_user("bob", "bobpw")
    bob = await login(client, "bob", "bobpw")
    slow_image = png_bytes(300, 200, (250, 0, 0))
    held, release = threading.Event(), threading.Event()
    real = image_module.make_thumbnail

    def make(source: bytes, px: int, fmt: str) -> bytes:
        if source == slow_image:
            held.set()
            release.wait(30)
        return real(source, px, fmt)

    monkeypatch.setattr(image_module, "make_thumbnail", make)
    hers = await new_workload(client, alice)
    r = await upload(client, alice, hers["workload_id"], slow_image)
    assert r.status == 200
    his = await new_workload(client, bob)
    r = await upload(client, bob, his["workload_id"], png_bytes(300, 200, (0, 250, 0)))
    assert r.status == 200
    pending = [asyncio.ensure_future(client.get("/images/0", headers=bearer(alice), params={
        "workload_id": hers["workload_id"], "size": size})) for size in ("small", "medium", "large")]
    await asyncio.get_running_loop().run_in_executor(None, held.wait, 30)
    try:
        r = await asyncio.wait_for(client.get("/images/0", headers=bearer(bob), params={
            "workload_id": his["workload_id"], "size": "small"}), 20)
        assert r.status == 200 and r.content_type == "image/png"
    finally:
        release.set()
    assert [r.status for r in await asyncio.gather(*pending)] == [200, 200, 200]


# -- the quota, raced ---------------------------------------------------------------------

async def test_concurrent_uploads_cannot_all_pass_the_quota(aiohttp_client, settings):
    """Ten 270 KB uploads at once under a 1 MB quota: three fit, the rest are 413, and what is
    stored stays within the quota (each upload's bytes are reserved with its row)."""
    from dataclasses import replace

    from server.services import build_app
    client = await aiohttp_client(build_app(replace(settings, quota_bytes=1_000_000)))
    token = await login(client)
    w = await new_workload(client, token)
    noise = [_noise_png(300, 300, seed) for seed in range(10)]
    assert all(260_000 < len(n) < 280_000 for n in noise)
    answers = await asyncio.gather(*(upload(client, token, w["workload_id"], n) for n in noise))
    statuses = sorted(r.status for r in answers)
    assert statuses == [200] * 3 + [413] * 7, statuses
    for r in answers:
        if r.status == 413:
            await assert_error(r, 413, "quota exceeded")
    assert await client.app[STORE].bytes_of("admin") <= 1_000_000
    assert len(_files_under(client.app[IMAGES].root)) == 3
    # The jobs of refused uploads never stay in line (each was queued as its upload's row was
    # being committed: those whose commit failed left the queue then), and none has a row.
    assert client.app[SCHEDULER].queued() == 3
    assert (await client.app[STORE].view_of(w["workload_id"])).image_count == 3


def _noise_png(width: int, height: int, seed: int) -> bytes:
    import random
    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


# -- errors that were not clear JSON 4xx, and unbounded tags --------------------------------

async def test_a_json_integer_of_five_thousand_digits_is_a_400(client):
    token = await login(client)
    r = await client.post("/workloads", data='{"workload_name": ' + "9" * 5000 + "}",
                          headers={**bearer(token), "Content-Type": "application/json"})
    body = await assert_error(r, 400, "malformed JSON")
    assert len(body["error"]) < 200


async def test_a_broken_images_error_names_no_object_of_ours(client):
    token = await login(client)
    w = await new_workload(client, token)
    for broken in (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, b"\xff\xd8\xff" + b"\x13" * 64, b"GIF89a" + b"\x01" * 8):
        body = await assert_error(await upload(client, token, w["workload_id"], broken), 400)
        assert "object at 0x" not in body["error"] and "incoming" not in body["error"], body
        assert "BytesIO" not in body["error"] and ".upload" not in body["error"], body


async def test_tags_are_bounded_and_named_like_workers_tags(client):
    token = await login(client)
    for tags, words in ((",".join(f"t{i}" for i in range(60_000)), "at most 32 tags"),
                        (",".join(f"t{i}" for i in range(33)), "at most 32 tags"),
                        ("gpu,big memory", "a tag is"), ("é", "a tag is")):
        r = await client.post("/workloads", data={"tags": tags}, headers=bearer(token))
        await assert_error(r, 400, words)
    ok = await new_workload(client, token, tags=",".join(f"t{i}" for i in range(32)))
    r = await client.get(f"/workloads/{ok['workload_id']}", headers=bearer(token))
    assert r.status == 200
    assert (await client.get("/workloads", headers=bearer(token))).status == 200
    assert len(await client.app[STORE].workloads("admin")) == 1, "nothing created by a refused request"
