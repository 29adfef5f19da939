"""What the second hostile review found (issue 31), each attack run against a real server and
real workers on loopback: pipeline bombs (every step's image bounded by --max-pixels before it
is made, a job's pixel-step budget), jobs that outlived their timeout, logins locked out by a
spray, workers' declarations that contradicted each other, text in ICC profiles and comments,
lenient numbers, a TLS key of another certificate, and hellos counted as refusals."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import io
import json
import os
import secrets
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pynng
from PIL import Image, ImageCms

from filtering import model, registry
from plane import declarations, localjoin, wire
from plane.seal import JOIN, W2C, join_key, seal_with
from tests.fakeworker import FakeWorker, Telemetry
from tests.helpers import (
    ADMIN_PASSWORD,
    LocalSystem,
    free_port,
    metric,
    png_bytes,
    ref,
    until,
    view,
    wait_completed,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent


def create(url: str, token: str, filter_: str) -> ref.Response:
    """POST /workloads with the filter (a pipeline's text) as a form."""
    return ref.request(url, "POST", "/workloads", urlencode({"filter": filter_}).encode(),
                       {**ref.bearer(token), "Content-Type": "application/x-www-form-urlencoded"})


def created(url: str, token: str, filter_: str) -> str:
    r = create(url, token, filter_)
    assert r.status == 200, r.body
    return r.json()["workload_id"]


def gif(frames: int, size: tuple[int, int] = (1, 1)) -> bytes:
    """An animated GIF of ``frames`` distinct frames (each its own colour, so none is merged)."""
    ims = [Image.new("RGB", size, (i * 7 % 256, 255 - i * 5 % 256, i * 3 % 256)) for i in range(frames)]
    out = io.BytesIO()
    ims[0].save(out, "GIF", save_all=True, append_images=ims[1:], duration=40, loop=0)
    return out.getvalue()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) from /proc."""
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def one_slot_system(tmp_path: Path, *server_args: str) -> Iterator[tuple[LocalSystem, str, int]]:
    """A server with ``server_args`` and one worker of one slot: (system, admin token, worker pid)."""
    sysm = LocalSystem(tmp_path / "data", log_dir=tmp_path / "logs", admin_password=ADMIN_PASSWORD,
                       server_args=server_args)
    with sysm:
        sysm.start_server()
        sysm.start_worker("w", "--capacity", "1")
        token = sysm.login()
        sysm.wait_workers({"w"}, token)
        yield sysm, token, sysm.workers["w"].pid


# -- 1: pipeline bombs --------------------------------------------------------------------------

REVIEW_BOMB = ("resize(width=10000,height=10000)|sepia|blur(radius=50)|sharpen(radius=50,percent=1000,threshold=0)"
               "|edges|contrast(factor=10)|brightness(factor=10)|pixelate(size=1000)|sepia|crop(width=1,height=1)")


def test_pipeline_bombs_are_refused_with_the_default_flags(system):
    """The review's 69-byte bomb and its variants, against a server with its default limits
    (50 megapixels, a budget of 200 million pixel-steps): refused where it can be known, with a
    400 naming the step, nothing created; another user's work goes on."""
    token = system.login()
    before = len(ref.get_json(system.url, token, "/workloads"))
    r = create(system.url, token, REVIEW_BOMB)
    assert r.status == 400 and "step 1 (resize) would make a 10000x10000 image" in r.json()["error"], r.body
    # Within the pixel limit, but past the budget even for a 1x1 image: refused at the step that passes it.
    r = create(system.url, token, "resize(width=7000,height=7000)|sepia|blur(radius=50)|sharpen|edges")
    assert r.status == 400 and "step 5 (edges)" in r.json()["error"] and "pixel-steps" in r.json()["error"], r.body
    assert len(ref.get_json(system.url, token, "/workloads")) == before, "nothing created"

    # The review's animated bomb: fine for one 1x1 frame, so the workload is made; a GIF of 30
    # frames would take 30 x 49 million pixel-steps at its first step: the upload is refused.
    wid = created(system.url, token, "resize(width=7000,height=7000)|blur(radius=50)|crop(width=1,height=1)")
    r = ref.upload(system.url, token, wid, "bomb.gif", gif(30))
    assert r.status == 400 and "pixel-steps" in r.json()["error"] and "step 1 (resize)" in r.json()["error"], r.body
    # A picture whose resize would pass the pixel limit: refused at upload, naming the step.
    tall = created(system.url, token, "resize(width=1000)|grayscale")
    r = ref.upload(system.url, token, tall, "tall.png", png_bytes(1, 1000))
    assert r.status == 400 and "step 1 (resize) would make a 1000x1000000 image" in r.json()["error"], r.body
    assert view(system.url, token, wid)["filtered_images"] == [] and ref.get_json(
        system.url, token, f"/images?workload_id={wid}") == []
    # Meanwhile an ordinary workload is filtered as ever.
    plain = created(system.url, token, "grayscale")
    assert ref.upload(system.url, token, plain, "0.png", png_bytes(64, 64)).status == 200
    assert wait_completed(system.url, token, plain, 60)["filtered_images"] == [0]


def test_a_worker_never_holds_more_than_its_limit_and_gives_the_memory_back(tmp_path):
    """A pipeline at the limits (every step's image at --max-pixels, the whole budget spent) runs;
    the worker's peak memory stays within ~12 bytes per pixel of --max-pixels above its idle
    size (two images of 3 bytes a pixel, Pillow's work buffers, a kernel's tiles), and it gives
    the memory back once the job is done."""
    max_pixels = 8_000_000
    with one_slot_system(tmp_path, "--max-pixels", str(max_pixels)) as (sysm, token, pid):
        side = int(max_pixels ** 0.5)  # 2828 x 2828: just under the limit
        r = create(sysm.url, token, f"resize(width={side + 10},height={side + 10})|blur")
        assert r.status == 400 and "more than the limit of 8000000 pixels" in r.json()["error"], r.body
        wid = created(sysm.url, token, f"resize(width={side},height={side})|sepia|blur(radius=50)|sepia")
        idle = proc_status(pid)["VmRSS"]
        assert ref.upload(sysm.url, token, wid, "0.png", png_bytes(1, 1)).status == 200
        assert wait_completed(sysm.url, token, wid, 120)["filtered_images"] == [0]
        with Image.open(io.BytesIO(ref.pull(sysm.url, token, wid, 0).body)) as got:
            assert got.size == (side, side)
        peak = proc_status(pid)["VmHWM"]
        bound = 20 * max_pixels // 1024  # kB: stated in the user guide as ~12 bytes a pixel, measured
        print(f"\nworker peak RSS {peak / 1024:.0f} MB, idle {idle / 1024:.0f} MB: +{(peak - idle) / 1024:.0f} MB"
              f" for images of {max_pixels / 1e6:.0f} megapixels ({(peak - idle) * 1024 / max_pixels:.1f} bytes a"
              f" pixel; bound {bound / 1024:.0f} MB)")
        assert peak - idle <= bound, f"peak {peak} kB, idle {idle} kB"
        wait_until(lambda: proc_status(pid)["VmRSS"] - idle < (peak - idle) / 3, 15,
                   "the worker to give back the job's memory")


# -- 2: a job that outlives its timeout -----------------------------------------------------------

def test_a_timed_out_job_stops_its_work_and_other_users_jobs_are_done(tmp_path):
    """The review's attack with --job-timeout: a GIF whose every frame is blown up to the pixel
    limit and blurred takes far longer than the timeout (the budget is raised for it). Each
    attempt is cancelled at its timeout and its work stops at the next step (the slot stays
    taken until it has); another user's job on the same one-slot worker ends done, the bomb
    ends failed for good, and the worker then burns no CPU and holds no more memory."""
    with one_slot_system(tmp_path, "--job-timeout", "3", "--max-pixels", "4000000",
                         "--max-pixel-steps", "4000000000") as (sysm, token, pid):
        idle = proc_status(pid)["VmRSS"]
        bomb = created(sysm.url, token, "resize(width=2000,height=2000)|blur(radius=50)|sharpen|blur(radius=50)"
                                        "|sharpen|crop(width=1,height=1)")
        assert ref.upload(sysm.url, token, bomb, "bomb.gif", gif(30)).status == 200
        wait_until(lambda: view(sysm.url, token, bomb)["status"] == "running", 30, "the bomb to run")

        subprocess.run([sys.executable, "main.py", "users", "--data-dir", str(sysm.data_dir), "add", "bob"],
                       cwd=ROOT, env={**os.environ, "DPIP_PASSWORD": "bob-password"}, check=True,
                       capture_output=True)
        bob = sysm.login("bob", "bob-password")
        his = created(sysm.url, bob, "grayscale")
        assert ref.upload(sysm.url, bob, his, "0.png", png_bytes(64, 64)).status == 200
        assert wait_completed(sysm.url, bob, his, 90)["filtered_images"] == [0], "another user's job is done"

        done = wait_completed(sysm.url, token, bomb, 90)
        assert [f["image_id"] for f in done["failed_images"]] == [0] and done["filtered_images"] == []
        assert "no reply within 3.0s" in done["failed_images"][0]["reason"], done
        # Its work has stopped: no filter thread goes on after the job ended.
        wait_until(lambda: ref.get_json(sysm.url, token, "/status")["workers"][0]["running_jobs"] == 0, 15,
                   "the worker to report no running job")
        before = cpu_seconds(pid)
        time.sleep(1.5)  # measuring an interval of CPU time, not waiting for a condition
        spent = cpu_seconds(pid) - before
        assert spent < 0.3, f"the worker burnt {spent:.2f} s of CPU in 1.5 s after the bomb ended"
        wait_until(lambda: proc_status(pid)["VmRSS"] - idle < 40 * 1024, 15,
                   "the worker's memory to return near its idle size")


# -- 3: lockouts ----------------------------------------------------------------------------------

def login_from(sysm: LocalSystem, source: str, user: str, password: str) -> tuple[int, dict]:
    """GET /login with Basic auth over a connection from ``source`` (127.x.y.z)."""
    import base64
    conn = http.client.HTTPConnection("127.0.0.1", sysm.port, timeout=30, source_address=(source, 0))
    try:
        cred = base64.b64encode(f"{user}:{password}".encode()).decode()
        conn.request("GET", "/login", headers={"Authorization": f"Basic {cred}"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def users(sysm: LocalSystem, *args: str, password: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", "users", "--data-dir", str(sysm.data_dir), *args],
                          cwd=ROOT, env={**os.environ, "DPIP_PASSWORD": password}, capture_output=True, text=True)


def test_a_spray_of_wrong_passwords_locks_no_one_out_even_after_a_restart(tmp_path):
    sysm = LocalSystem(tmp_path / "data", log_dir=tmp_path / "logs", admin_password=ADMIN_PASSWORD,
                       server_args=("--login-slowdown", "0.2"))
    with sysm:
        sysm.start_server()
        assert users(sysm, "add", "carol", password="carol-password").returncode == 0
        # 20 wrong passwords from 4 addresses for a user who never logged in...
        for i in range(20):
            assert login_from(sysm, f"127.0.1.{i % 4 + 1}", "carol", "wrong")[0] in (401, 429)
        # ...and she still gets in, from an address of her own.
        status, body = login_from(sysm, "127.0.0.9", "carol", "carol-password")
        assert status == 200 and body["token"], body
        assert login_from(sysm, "127.0.0.2", "admin", ADMIN_PASSWORD)[0] == 200  # the admin's usual place

        sysm.server.terminate()
        sysm.server.wait(15)
        sysm.start_server()  # familiar places are in the datastore, not in memory
        for i in range(24):
            login_from(sysm, f"127.0.2.{i % 4 + 1}", "admin", "wrong")
        slowed = metric(sysm.url, "dpip_logins_slowed_total")
        assert login_from(sysm, "127.0.0.2", "admin", ADMIN_PASSWORD)[0] == 200
        assert metric(sysm.url, "dpip_logins_slowed_total") == slowed, "the familiar place is not slowed"
        assert login_from(sysm, "127.0.0.3", "admin", ADMIN_PASSWORD)[0] == 200, "a new place: slowed, not refused"
        assert metric(sysm.url, "dpip_logins_slowed_total") == slowed + 1

        # One address's failures block that address for that user; the admin's unlock forgives them.
        for _ in range(6):
            login_from(sysm, "127.0.0.5", "carol", "wrong")
        assert login_from(sysm, "127.0.0.5", "carol", "carol-password")[0] == 429
        done = users(sysm, "unlock", "carol")
        assert done.returncode == 0 and "unlocked user 'carol'" in done.stdout, done.stderr
        assert login_from(sysm, "127.0.0.5", "carol", "carol-password")[0] == 200
        assert users(sysm, "unlock", "nobody").returncode != 0


# -- 4: workers' declarations ---------------------------------------------------------------------

def _vignette(low: float, high: float, version: str, size: str = "same", colour: str = "keeps") -> wire.FilterDeclaration:
    spec = model.define("vignette", "darker corners", model.Param("strength", float, 0.5, low, high),
                          size=size, colour=colour)(lambda im, p: im)
    return declarations.declaration_of(dataclasses.replace(spec, version=version))


async def _fake(name: str, sysm: LocalSystem, declared: list[wire.FilterDeclaration]) -> FakeWorker:
    fake = FakeWorker(name, sysm.controller, Telemetry())
    fake.link.joined = wire.Joined(declared)
    return await fake.start()


async def test_declarations_cannot_loosen_a_plugins_checks_nor_swell_the_filter_list(make_system):
    sysm = make_system()
    token = sysm.login()
    honest = await _fake("honest", sysm, [_vignette(0.0, 1.0, "1.2.0")])
    await until(lambda: "honest" in sysm.alive_workers(token), 30, "the honest worker to join")  # (the first wins)
    liar = await _fake("liar", sysm, [_vignette(-9e15, 9e15, "1.2.0", size="changes", colour="any")])
    other = await _fake("other", sysm, [_vignette(-9e15, 9e15, "6.6.6")])
    many = await _fake("many", sysm, [declarations.declaration_of(model.FilterSpec(f"made_up_{i}", None, (), "x" * 200))
                                      for i in range(128)])
    try:
        await until(lambda: {"honest", "liar", "other", "many"} <= sysm.alive_workers(token), 30, "the fakes to join")
        named = {f["name"]: f for f in ref.get_json(sysm.url, token, "/filters")}
        runners = {o["worker"]: o["version"] for o in named["vignette"]["offered_by"]}
        assert runners == {"honest": "1.2.0", "other": "6.6.6"}, "the liar's 1.2.0 contradicts the honest one"
        workers = {w["name"]: w for w in ref.get_json(sysm.url, token, "/status")["workers"]}
        assert "vignette" not in workers["liar"]["filters"]
        # Validated against every declaration a job may be placed on: the honest bounds hold.
        r = create(sysm.url, token, "vignette(strength=9e15)")
        assert r.status == 400 and "strength must be between 0 and 1" in r.json()["error"], r.body
        assert create(sysm.url, token, "vignette(strength=0.5)").status == 200
        # The anonymous listing is the server's own filters: its size does not grow with the fleet.
        public = ref.request(sysm.url, "GET", "/filters")
        assert public.status == 200 and len(public.body) < 16_000
        assert {f["name"] for f in public.json()} == set(registry.REGISTRY)
        assert len([n for n in named if n.startswith("made_up_")]) == 128
    finally:
        for fake in (honest, liar, other, many):
            await fake.close()


# -- 5: metadata that survived ------------------------------------------------------------------

SECRET = b"SECRET-7f3a"


def secret_profile() -> bytes:
    """An sRGB profile whose description, copyright and a private tag carry the secret text."""
    base = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    count = struct.unpack(">I", base[128:132])[0]
    tags = []
    for i in range(count):
        sig, offset, size = struct.unpack(">4sII", base[132 + 12 * i:144 + 12 * i])
        if sig not in (b"desc", b"cprt"):
            tags.append((sig, base[offset:offset + size]))
    text = b"text" + bytes(4) + SECRET + b" taken at home\0"
    tags += [(b"desc", b"desc" + bytes(4) + struct.pack(">I", len(SECRET) + 1) + SECRET + b"\0" + bytes(78)),
             (b"cprt", text), (b"zzzz", text)]
    body, table = bytearray(), bytearray(struct.pack(">I", len(tags)))
    at = 132 + 12 * len(tags)
    for sig, data in tags:
        table += struct.pack(">4sII", sig, at + len(body), len(data))
        body += data + bytes(-len(data) % 4)
    out = bytearray(base[:128]) + table + body
    out[0:4] = struct.pack(">I", len(out))
    return bytes(out)


def test_results_and_thumbnails_carry_no_text_from_profiles_or_comments(system):
    token = system.login()
    icc = secret_profile()
    im = Image.new("RGB", (80, 60), (200, 120, 40))
    png, jpeg, gif_ = io.BytesIO(), io.BytesIO(), io.BytesIO()
    im.save(png, "PNG", icc_profile=icc)
    im.save(jpeg, "JPEG", icc_profile=icc, comment=SECRET)
    im.convert("P").save(gif_, "GIF", comment=SECRET)
    for pipeline_, data in (("blur", png.getvalue()), ("sharpen|brightness", png.getvalue()),
                            ("format(type=png)", jpeg.getvalue()), ("blur", jpeg.getvalue()),
                            ("blur", gif_.getvalue())):
        wid = created(system.url, token, pipeline_)
        assert ref.upload(system.url, token, wid, "0.img", data).status == 200
        wait_completed(system.url, token, wid, 60)
        result = ref.pull(system.url, token, wid, 0).body
        assert SECRET not in result, f"{pipeline_}: the result carries the text"
        with Image.open(io.BytesIO(result)) as got:
            if got.format != "GIF":
                kept = got.info.get("icc_profile")
                assert kept and ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(kept))).strip() \
                    == "colour profile", "the colours' profile is kept, without its text"
        for size in ("small", "large"):
            r = ref.request(system.url, "GET", f"/images/0?workload_id={wid}&type=original&size={size}",
                            headers=ref.bearer(token))
            assert r.status == 200 and SECRET not in r.body, f"{pipeline_}: the {size} thumbnail carries the text"


# -- 6: lenient numbers -----------------------------------------------------------------------------

def test_numbers_are_ascii_decimals_and_json_keys_are_given_once(system):
    token = system.login()
    jsonh = {**ref.bearer(token), "Content-Type": "application/json"}
    for body, words in ((b'{"filter": "resize", "width": 100.5}', "width must be an integer"),
                        ('{"filter": [{"name": "resize", "params": {"width": "\uff11\uff10\uff10"}}]}'.encode(),
                         "width must be an integer"),
                        (b'{"filter": [{"name": "rotate", "params": {"degrees": 1e-320}}]}', "must be a number"),
                        (b'{"filter": "blur", "filter": "grayscale"}', "given twice"),
                        (b'{"filter": [{"name": "blur", "params": {"radius": 1, "radius": 2}}]}', "given twice")):
        r = ref.request(system.url, "POST", "/workloads", body, jsonh)
        assert r.status == 400 and words in r.json()["error"], (body, r.body)
    for text, words in (("blur(radius=1_0)", "must be a number"), ("rotate(degrees=1e-320)", "must be a number"),
                        ("resize(width=1e2)", "must be an integer")):
        r = create(system.url, token, text)
        assert r.status == 400 and words in r.json()["error"], (text, r.body)
    r = create(system.url, token, "rotate(degrees=-0.0)|blur(radius=2.5)")
    assert r.status == 200 and r.json()["filter"] == "rotate(degrees=0.0)|blur(radius=2.5)", r.body


# -- 7: TLS files ---------------------------------------------------------------------------------

def test_a_key_of_another_certificate_is_one_line_naming_both(tmp_path):
    from admin import certs
    certs.init(tmp_path / "a", ["127.0.0.1"])
    certs.init(tmp_path / "b", ["127.0.0.1"])
    cert, key = tmp_path / "a" / "server.pem", tmp_path / "b" / "server.key"
    p = subprocess.run([sys.executable, "main.py", "--port", str(free_port()), "--controller-port", str(free_port()),
                        "--data-dir", str(tmp_path / "data"),
                        "--tls-cert", str(cert), "--tls-key", str(key)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode == 2 and "Traceback" not in out, out
    line = next(ln for ln in out.splitlines() if "does not belong" in ln)
    assert str(key) in line and str(cert) in line

    def worker_certs(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "main.py", "certs", "worker", str(tmp_path / "a"), "w1", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)

    first = worker_certs()
    assert first.returncode == 0, first.stderr
    pem = (tmp_path / "a" / "worker-w1.pem").read_bytes()
    again = worker_certs()
    assert again.returncode == 2 and "exists already" in again.stderr and "--force" in again.stderr
    assert (tmp_path / "a" / "worker-w1.pem").read_bytes() == pem, "nothing replaced"
    forced = worker_certs("--force")
    assert forced.returncode == 0 and "stays valid until it expires" in forced.stdout
    assert (tmp_path / "a" / "worker-w1.pem").read_bytes() != pem


# -- 8: false alarms ------------------------------------------------------------------------------

def test_a_hello_whose_connection_is_gone_is_no_refusal(make_system):
    """Workers restarting: a hello read after its connection closed is dropped quietly (its own
    counter), while a hello naming another host's address still counts as refused."""
    sysm = make_system()
    token = localjoin.read(sysm.controller_port)
    join = join_key(token)
    refused = metric(sysm.url, "dpip_worker_plane_refused")

    def hello(name: str, address: str) -> bytes:
        return wire.join(seal_with(join, JOIN, W2C, 1, wire.Hello(name, secrets.token_hex(16), address, secrets.token_hex(8))))

    def vanish_once() -> bool:
        with pynng.Pub0(send_timeout=1000) as pub:
            pub.dial(f"tcp://{sysm.controller}", block=True)
            for _ in range(20):  # (one name: a hello read in time starts one welcome, then waits its turn)
                pub.send(hello("gone", "tcp://127.0.0.1:9"))
        return metric(sysm.url, "dpip_worker_plane_vanished") > 0

    wait_until(vanish_once, 60, "a hello to arrive after its connection closed", interval=0.2)
    assert metric(sysm.url, "dpip_worker_plane_refused") == refused, "a vanished hello is no refusal"
    with pynng.Pub0(send_timeout=1000) as pub:
        pub.dial(f"tcp://{sysm.controller}", block=True)

        def refused_one() -> bool:
            pub.send(hello("elsewhere", "tcp://192.0.2.7:4000"))  # another host's address: never dialed
            return metric(sysm.url, "dpip_worker_plane_refused") > refused

        wait_until(refused_one, 30, "a hello naming another host to be refused", interval=0.2)
