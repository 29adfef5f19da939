"""HTTP hardening: login throttling under concurrency, trusted proxies, pixel and form limits,
private files, tokens of removed users, per-owner workload names, clients that hang up, and
small error bodies."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import ipaddress
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import uuid

import pytest
from PIL import Image, JpegImagePlugin

from api import multipart
from api.keys import AUTH, SETTINGS
from api.net import client_address, parse_cidrs
from api.ratelimit import LoginThrottle
from common.models import (
    BadInput,
    Filter,
    TooManyRequests,
    Unauthorized,
    check_workload_name,
    quoted,
)
from controller.auth import USER
from controller.jobs import JobLifecycle
from server.services import build_app
from storage.sqlite import SCHEMA, SqliteDatastore
from storage.thumbnails import make_thumbnail
from tests.helpers import (
    ADMIN_PASSWORD,
    ROOT,
    assert_error,
    basic,
    bearer,
    login,
    new_workload,
    png_bytes,
    ref,
    until,
    upload,
    wait_until,
)

# -- 1. login throttling under concurrency ----------------------------------------------------


async def test_concurrent_wrong_logins_cannot_outrun_the_throttle(client):
    """40 wrong passwords at once, 5 failures allowed a minute: 5 are tried, 35 get 429.
    (Each attempt is counted before its slow hash; a few run at once, the others wait.)"""
    rs = await asyncio.gather(*(client.get("/login", headers=basic("admin", "wrong")) for _ in range(40)))
    statuses = [r.status for r in rs]
    assert sorted(statuses) == [401] * 5 + [429] * 35, statuses
    for r in rs:
        if r.status == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert "try again" in (await r.json())["error"]
    # Blocked now, even with the right password (no oracle while blocked).
    r = await client.get("/login", headers=basic("admin", ADMIN_PASSWORD))
    await assert_error(r, 429, "try again")


async def test_concurrent_right_logins_from_one_address_all_succeed(client):
    """Many clients behind one address logging in at once wait their turn; none is refused."""
    rs = await asyncio.gather(*(client.get("/login", headers=basic("admin", ADMIN_PASSWORD)) for _ in range(30)))
    assert [r.status for r in rs] == [200] * 30


async def test_login_throttle_counts_an_attempt_from_its_start():
    now = [0.0]
    t = LoginThrottle(failures=3, window=60, max_in_flight=2, max_wait=0.05, clock=lambda: now[0])
    a, b = await t.begin("u", "1.1.1.1"), await t.begin("u", "1.1.1.1")
    with pytest.raises(TooManyRequests, match="at once"):  # a third waits for them, too long
        await t.begin("u", "1.1.1.1")
    third = asyncio.ensure_future(t.begin("u", "1.1.1.1"))
    await asyncio.sleep(0)
    t.end(a, ok=False)  # makes room: the waiting one is admitted
    c = await third
    with pytest.raises(TooManyRequests, match="failed logins") as e:  # 3 counted, none may succeed
        t.end(b, ok=False)
        t.end(c, ok=False)
        await t.begin("u", "1.1.1.1")
    assert e.value.retry_after > 0
    now[0] += 61  # the window has passed
    d = await t.begin("u", "1.1.1.1")
    t.end(d, ok=True)  # a success clears the user's count and takes back its own
    assert t.per_user.retry_after(("u", "1.1.1.1")) == 0
    assert "1.1.1.1" not in t.per_address._failures


# -- 2. trusted proxies -----------------------------------------------------------------------


def test_client_address_trusts_only_configured_proxies():
    proxies = parse_cidrs("127.0.0.1/32, 10.0.0.0/8")
    assert proxies == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))
    assert client_address("127.0.0.1", ["6.6.6.6"], ()) == "127.0.0.1"  # no proxies: header ignored
    assert client_address("9.9.9.9", ["6.6.6.6"], proxies) == "9.9.9.9"  # not from a proxy
    assert client_address("127.0.0.1", ["6.6.6.6"], proxies) == "6.6.6.6"
    # The right-most address no trusted proxy vouches for; what the client wrote left of it is not used.
    assert client_address("127.0.0.1", ["1.2.3.4, 5.6.7.8, 10.1.1.1"], proxies) == "5.6.7.8"
    assert client_address("127.0.0.1", ["1.2.3.4", "5.6.7.8"], proxies) == "5.6.7.8"
    assert client_address("::ffff:127.0.0.1", ["5.6.7.8"], proxies) == "5.6.7.8"
    assert client_address("127.0.0.1", [], proxies) == "127.0.0.1"
    with pytest.raises(ValueError, match="nonsense"):
        parse_cidrs("10.0.0.0/8,nonsense")


async def _wrong_logins(client, n: int, forwarded: str) -> list[int]:
    headers = {**basic("admin", "wrong"), "X-Forwarded-For": forwarded}
    return [(await client.get("/login", headers=headers)).status for _ in range(n)]


async def test_forwarded_for_is_ignored_without_a_trusted_proxy(client):
    """An attacker cannot pick his throttling key by sending a new X-Forwarded-For each time."""
    statuses = [(await _wrong_logins(client, 1, f"10.0.0.{i}"))[0] for i in range(7)]
    assert statuses == [401] * 5 + [429] * 2


async def test_clients_behind_a_trusted_proxy_are_throttled_apart(aiohttp_client, settings):
    trusted = dataclasses.replace(settings, trusted_proxies=parse_cidrs("127.0.0.1/32"))
    client = await aiohttp_client(build_app(trusted))
    assert await _wrong_logins(client, 6, "203.0.113.1") == [401] * 5 + [429]
    # Another client of the proxy is not blocked; a made-up hop in front changes nothing.
    assert await _wrong_logins(client, 1, "203.0.113.2") == [401]
    assert await _wrong_logins(client, 1, "198.51.100.7, 203.0.113.1") == [429]


# -- 3. pixels --------------------------------------------------------------------------------


def test_pixel_limit_defaults_and_flag():
    from server.settings import ServerSettings, parse_server_args

    assert ServerSettings().max_pixels == 50_000_000
    assert parse_server_args(["--max-pixels", "1234"])[0].max_pixels == 1234


def test_server_refuses_images_over_its_pixel_limit_and_takes_those_at_it(make_system):
    system = make_system("--max-pixels", "1200")
    token = system.login()
    wid = ref.create_workload(system.url, token)["workload_id"]
    r = ref.upload(system.url, token, wid, "0.png", png_bytes(40, 30))  # exactly 1200: no warning
    assert r.status == 200, r.body
    r = ref.upload(system.url, token, wid, "1.png", png_bytes(41, 30))
    assert r.status == 400 and "pixels" in r.json()["error"], r.body
    r = ref.request(system.url, "GET", f"/images/0?workload_id={wid}&size=small", headers=ref.bearer(token))
    assert r.status == 200
    with Image.open(io.BytesIO(r.body)) as im:
        assert im.size == (40, 30)  # never enlarged


def test_jpeg_thumbnails_are_decoded_reduced(tmp_path, monkeypatch):
    out = io.BytesIO()
    Image.new("RGB", (2400, 1600), (10, 200, 30)).save(out, "JPEG")
    drafts = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):
        result = real_draft(self, mode, size)
        drafts.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    thumb = make_thumbnail(out.getvalue(), 300, "JPEG")
    assert drafts and drafts[0][0] <= 1200  # decoded at 1/2 scale or less, never the full 2400
    with Image.open(io.BytesIO(thumb)) as im:
        assert im.size == (300, 200)


# -- 4. multipart fields ----------------------------------------------------------------------


async def test_upload_with_too_many_form_fields_is_413(client):
    token = await login(client)
    w = await new_workload(client, token)
    extra = {f"f{i}": "x" for i in range(100)}
    r = await upload(client, token, w["workload_id"], png_bytes(), extra=extra)
    await assert_error(r, 413, "too many form fields", "32")
    r = await upload(client, token, w["workload_id"], png_bytes(), extra={"a": "x" * 40_000, "b": "y" * 40_000})
    await assert_error(r, 413, "form fields too large")
    r = await upload(client, token, w["workload_id"], png_bytes(), extra={"note": "n" * 1000})
    assert r.status == 200, await r.text()
    assert not list(client.app[SETTINGS].incoming_dir.glob("*.upload"))


async def test_parameters_in_a_multipart_body_are_capped_too(client):
    token = await login(client)
    body, ctype = ref.multipart({f"f{i}": "x" for i in range(40)}, "ignored", "a.bin", b"")
    r = await client.post("/workloads", data=body, headers={**bearer(token), "Content-Type": ctype})
    await assert_error(r, 413, "too many form fields")
    body, ctype = ref.multipart({"workload_name": "fine", "filter": "blur"}, "ignored", "a.bin", b"")
    r = await client.post("/workloads", data=body, headers={**bearer(token), "Content-Type": ctype})
    assert r.status == 200 and (await r.json())["workload_name"] == "fine"


# -- 5. private files -------------------------------------------------------------------------


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_data_dir_and_files_are_private(make_system):
    system = make_system()
    token = system.login()
    w = ref.create_workload(system.url, token)
    assert ref.upload(system.url, token, w["workload_id"], "0.png", png_bytes()).status == 200
    r = ref.request(system.url, "GET", f"/images/0?workload_id={w['workload_id']}&size=small",
                    headers=ref.bearer(token))
    assert r.status == 200
    data = system.data_dir
    assert _mode(data) == 0o700
    assert _mode(data / "dpip.sqlite3") == 0o600
    assert _mode(data / "jwt-secret") == 0o600
    files = [p for p in (data / "images").rglob("*") if p.is_file()]
    assert len(files) == 2  # the original and its thumbnail
    assert {_mode(p) for p in files} == {0o600}
    for folder in (data / "images", data / "incoming", *{p.parent for p in files}):
        assert _mode(folder) & 0o077 == 0, folder
    for extra in data.glob("dpip.sqlite3-*"):
        assert _mode(extra) == 0o600, extra


# -- 6. removed users -------------------------------------------------------------------------


async def test_a_token_issued_before_its_account_was_created_is_refused(client):
    auth = client.app[AUTH]
    early = auth.issue("dave", USER)  # e.g. a removed dave's, signed before the new dave exists
    await asyncio.sleep(0.002)  # the clock must move on (ms precision); not a synchronisation
    await auth.add_user("dave", "davepw-12")
    with pytest.raises(Unauthorized, match="earlier account"):
        auth.verify(early, (USER,))
    fresh = auth.issue("dave", USER)  # same second as the creation: still good
    assert auth.verify(fresh, (USER,)).subject == "dave"


def _users(system, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DPIP_PASSWORD": "bob-password-1"}
    return subprocess.run([sys.executable, "main.py", "users", "--data-dir", str(system.data_dir), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_a_removed_user_stays_removed_when_the_name_comes_back(make_system):
    system = make_system()
    assert _users(system, "add", "bob").returncode == 0
    old = ref.login(system.url, "bob", "bob-password-1")
    wid = ref.create_workload(system.url, old)["workload_id"]
    assert _users(system, "remove", "bob").returncode == 0
    status = lambda t: ref.request(system.url, "GET", "/status", headers=ref.bearer(t)).status  # noqa: E731
    wait_until(lambda: status(old) == 401, 5, "the running server to drop bob's token")
    assert _users(system, "add", "bob").returncode == 0
    assert status(old) == 401
    new = ref.login(system.url, "bob", "bob-password-1")
    assert status(new) == 200
    assert ref.get_json(system.url, new, "/workloads") == []  # the old bob's work is not his
    assert ref.request(system.url, "GET", f"/workloads/{wid}", headers=ref.bearer(new)).status == 404
    system.stop()
    system.start_server()
    assert status(old) == 401 and status(new) == 200
    with sqlite3.connect(system.data_dir / "dpip.sqlite3") as db:
        (owner,) = db.execute("SELECT owner FROM workloads WHERE id = ?", (wid,)).fetchone()
    assert owner.startswith("removed:bob:")


# -- 7. workload names per owner --------------------------------------------------------------


async def test_workload_names_are_per_owner(client):
    admin = await login(client)
    await client.app[AUTH].add_user("bob", "bobpw")
    bob = await login(client, "bob", "bobpw")
    a = await new_workload(client, admin, workload_name="holiday")
    b = await new_workload(client, bob, workload_name="holiday")
    assert a["workload_id"] != b["workload_id"]
    r = await client.post("/workloads", headers=bearer(bob), data={"workload_name": "holiday"})
    await assert_error(r, 409, "holiday")
    for token, w in ((admin, a), (bob, b)):
        listed = await (await client.get("/workloads", headers=bearer(token))).json()
        assert [x["workload_id"] for x in listed] == [w["workload_id"]]
    # Each keeps its own images, in its own directory.
    pics = {admin: png_bytes(10, 10, (1, 2, 3)), bob: png_bytes(12, 10, (4, 5, 6))}
    for token, w in ((admin, a), (bob, b)):
        assert (await upload(client, token, w["workload_id"], pics[token])).status == 200
    for token, w in ((admin, a), (bob, b)):
        r = await client.get(f"/images/0?workload_id={w['workload_id']}", headers=bearer(token))
        assert r.status == 200 and await r.read() == pics[token]
    images = client.app[SETTINGS].images_dir
    assert (images / "holiday" / "original" / "0.png").read_bytes() == pics[admin]
    assert (images / f"holiday.{b['workload_id'][:8]}" / "original" / "0.png").read_bytes() == pics[bob]


OLD_WORKLOADS = """
CREATE TABLE workloads (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, owner TEXT NOT NULL, filter TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, next_image_id INTEGER NOT NULL DEFAULT 0,
    meta TEXT NOT NULL DEFAULT '{}'
);
"""


async def test_an_old_datastore_is_migrated_to_per_owner_names(tmp_path):
    path = tmp_path / "dpip.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_WORKLOADS)
        db.executescript(SCHEMA)  # the other tables (workloads exists: kept as it was)
        db.execute("INSERT INTO workloads(id, name, owner, filter, created_at, next_image_id)"
                   " VALUES ('w1', 'clip', 'admin', 'grayscale', 1.0, 1)")
        db.execute("INSERT INTO images(workload_id, image_id, type, format, size, created_at)"
                   " VALUES ('w1', 0, 'original', 'PNG', 10, 1.0)")
        db.execute("INSERT INTO jobs(workload_id, image_id, state, created_at) VALUES ('w1', 0, 'queued', 1.0)")
    store = SqliteDatastore(path)
    await store.open()  # rebuilds workloads
    try:
        jobs = JobLifecycle(store)
        assert [(j.workload_id, j.image_id) for j in await jobs.recover()] == [("w1", 0)]
        await jobs.enqueue(await store.get_workload("w1"), 1, "PNG", 10)  # references still hold
        old = await store.get_workload("w1", "admin")
        assert (old.name, old.dir) == ("clip", "clip")
        assert (await store.workload_view(old)).image_count == 2, "counters counted at migration, then kept"
        bobs = await store.create_workload("clip", "bob", Filter.GRAYSCALE, ())
        assert bobs.dir.startswith("clip.") and bobs.dir != "clip"
        assert (await store.get_workload(bobs.id)).dir == bobs.dir
        async with store.db.execute("PRAGMA foreign_key_check") as cur:
            assert await cur.fetchall() == []
        async with store.db.execute("PRAGMA foreign_keys") as cur:
            assert (await cur.fetchone())[0] == 1
    finally:
        await store.close()
    again = SqliteDatastore(path)
    await again.open()  # a second start does not migrate again
    await again.close()


# -- 8. names: fullmatch ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bob\n", "bob\n\n", "\nbob", "a/b", "", "x" * 65, ".."])
def test_names_must_match_entirely(name):
    with pytest.raises(BadInput):
        check_workload_name(name)


def test_users_add_refuses_a_name_with_a_trailing_newline(tmp_path, monkeypatch):
    from admin import users

    monkeypatch.setenv("DPIP_PASSWORD", "long-enough-pw")
    assert users.main(["--data-dir", str(tmp_path), "add", "bob\n"]) == 1
    assert users.main(["--data-dir", str(tmp_path), "add", "bob"]) == 0
    with sqlite3.connect(tmp_path / "dpip.sqlite3") as db:
        assert db.execute("SELECT name FROM users").fetchall() == [("bob",)]


# -- 9. clients that hang up mid-upload -------------------------------------------------------


def test_a_client_that_hangs_up_mid_upload_leaves_nothing_behind(make_system):
    system = make_system()
    token = system.login()
    wid = ref.create_workload(system.url, token)["workload_id"]
    # a PNG header, then more than one write's worth, and more than a body read whole
    data = png_bytes(16, 16) + os.urandom(multipart.WHOLE_BODY + (1 << 20))
    body, ctype = ref.multipart({"workload_id": wid}, "data", "0.png", data)
    head = (f"POST /images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    incoming = system.data_dir / "incoming"
    with socket.create_connection(("127.0.0.1", system.port)) as conn:
        conn.sendall(head + body[: len(body) // 2])
        wait_until(lambda: list(incoming.glob("*.upload")), 10, "the upload to reach the disk")
    wait_until(lambda: not list(incoming.glob("*.upload")), 10, "the cut-off upload to be dropped")
    assert ref.get_json(system.url, token, "/status")["system_name"]  # still serving
    assert ref.get_json(system.url, token, f"/workloads/{wid}")["images"] == 0
    assert ref.upload(system.url, token, wid, "0.png", png_bytes()).status == 200
    assert "Traceback" not in (system.log_dir / "server.log").read_text()


async def test_bodies_read_whole_give_their_bytes_back(client):
    """A body of a few MiB is read whole while the budget for such bodies allows (it streams
    beyond): its bytes are given back when it was stored, refused, or cut off by its client."""
    token = await login(client)
    wid = (await new_workload(client, token))["workload_id"]
    im = Image.frombytes("RGB", (640, 640), os.urandom(640 * 640 * 3))
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=0)
    big = buf.getvalue()
    assert multipart.SMALL_BODY < len(big) < multipart.WHOLE_BODY
    body, ctype = ref.multipart({"workload_id": wid}, "data", "0.png", big)
    r = await client.post("/images", data=io.BytesIO(body), headers={**bearer(token), "Content-Type": ctype})
    assert r.status == 200, await r.text()
    assert multipart.WHOLE_BUDGET.held == 0
    r = await client.get(f"/images/0?workload_id={wid}", headers=bearer(token))
    assert r.status == 200 and await r.read() == big

    boundary = "b" * 20
    broken = b"--" + boundary.encode() + b"\r\nno blank line" + b"x" * (1 << 20)
    r = await client.post("/images", data=io.BytesIO(broken), headers={
        **bearer(token), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    await assert_error(r, 400, "multipart")
    assert multipart.WHOLE_BUDGET.held == 0

    body, ctype = ref.multipart({"workload_id": wid}, "data", "1.png", big)
    head = (f"POST /images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(head + body[: len(body) // 2])
    await writer.drain()
    await until(lambda: multipart.WHOLE_BUDGET.held > 0, 10, "the body to be read whole")
    writer.close()
    await until(lambda: multipart.WHOLE_BUDGET.held == 0, 10, "the cut-off body's bytes given back")
    r = await client.get(f"/workloads/{wid}", headers=bearer(token))
    assert (await r.json())["images"] == 1


# -- 10. small error bodies -------------------------------------------------------------------


def test_quoted_cuts_long_input():
    assert quoted("abc") == "'abc'"
    assert quoted("x" * 1000) == repr("x" * 80) + "…"


async def test_error_bodies_quote_little_of_the_input(client):
    token = await login(client)
    huge = "n" * 100_000
    for params in ({"workload_name": huge}, {"filter": huge}):
        r = await client.post("/workloads", headers=bearer(token), data=params)
        assert r.status == 400 and len(await r.read()) < 1024
    w = await new_workload(client, token)
    for extra in ({"type": "t" * 50_000}, {"image_id": "9" * 50_000}):
        r = await upload(client, token, w["workload_id"], png_bytes(), extra=extra)
        assert r.status == 400 and len(await r.read()) < 1024, extra
    r = await client.get(f"/images/0?workload_id={'w' * 5000}", headers=bearer(token))
    assert r.status == 404 and len(await r.read()) < 1024
    r = await client.get("/" + "p" * 5000, headers=bearer(token))
    assert r.status == 404 and len(await r.read()) < 1024


def test_the_owner_of_a_removed_users_workloads_is_no_user_name():
    """Re-owned workloads' owner has a ':', which no user name may contain."""
    with pytest.raises(BadInput):
        check_workload_name(f"removed:bob:{uuid.uuid4().hex[:8]}")
