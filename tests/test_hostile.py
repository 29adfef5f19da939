"""Hostile input, table-driven: every endpoint and both kinds of nng socket, against the real
server and a real worker. Each bad input gets its clear 4xx (or is dropped, on nng); after the
whole table the system still serves, and images stored before it are byte-identical."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import time
import zlib
from pathlib import Path

import jwt
import pynng
from PIL import Image

from tests.helpers import (
    check_filtered,
    frame_png,
    publish_until_dropped,
    push,
    ref,
    send_oversized,
    wait_completed,
    wait_until,
    workload,
)

MAX_UPLOAD = 300_000


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's calling card)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = zlib.compress(b"\x00" * 1000)
    body += struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + body + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, dict[str, str]]:
    boundary = "xXx-boundary-xXx"
    out = bytearray()
    for name, filename, data in files:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{filename}"\r\n\r\n').encode() + data + b"\r\n"
    for k, v in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_hostile_inputs_table(make_system, tmp_path):
    system = make_system("--max-upload-bytes", str(MAX_UPLOAD))
    token = system.start_workers({"w": ()})
    url = system.url
    secret = bytes.fromhex((system.data_dir / "jwt-secret").read_text().strip())

    def mint(sub: str, scope: str, ttl: float = 600, key: bytes | None = secret, alg: str = "HS256") -> str:
        claims = {"sub": sub, "scope": scope, "jti": os.urandom(8).hex(), "exp": int(time.time() + ttl)}
        return jwt.encode(claims, key, algorithm=alg)

    # Things that exist before the table: they must come out of it untouched.
    wid = workload(url, token, workload_name="before")
    before = {i: frame_png(i, 60, 40) for i in range(2)}
    push(system, token, wid, before)
    wait_completed(url, token, wid)
    stored_before = {p: p.read_bytes() for p in (system.data_dir / "images").rglob("*") if p.is_file()}
    mallory_pw = "mallory-pw-123"
    r = ref.request(url, "POST", "/workloads", headers=ref.bearer(token))  # a second workload of admin's
    other_wid = r.json()["workload_id"]
    assert r.status == 200
    env = {**os.environ, "DPIP_PASSWORD": mallory_pw}
    import subprocess
    import sys

    from tests.helpers import ROOT
    subprocess.run([sys.executable, "main.py", "users", "--data-dir", str(system.data_dir), "add", "mallory"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=60)
    mallory = ref.login(url, "mallory", mallory_pw)
    revoked = ref.login(url, "admin", system.admin_password)
    assert ref.request(url, "DELETE", "/logout", headers=ref.bearer(revoked)).status == 200
    worker_token = mint("w", "worker")
    png = frame_png(9, 30, 20)
    auth = ref.bearer(token)
    json_h = {**auth, "Content-Type": "application/json"}

    def up(fields: dict[str, str], files: list[tuple[str, str, bytes]], who: dict[str, str] = auth):
        body, h = multipart(fields, files)
        return ("POST", "/images", body, {**who, **h})

    table: list[tuple[str, tuple, int, str]] = [
        # -- authentication and tokens
        ("no token", ("GET", "/status", None, {}), 401, "missing token"),
        ("not a bearer", ("GET", "/status", None, {"Authorization": "Token x"}), 401, "missing token"),
        ("garbage token", ("GET", "/status", None, ref.bearer("a.b.c")), 401, "invalid token"),
        ("forged token", ("GET", "/status", None, ref.bearer(mint("admin", "user", key=b"k" * 32))), 401, "invalid token"),
        ("alg none", ("GET", "/status", None, ref.bearer(mint("admin", "user", key=None, alg="none"))), 401, "invalid token"),
        ("expired token", ("GET", "/status", None, ref.bearer(mint("admin", "user", ttl=-60))), 401, "expired"),
        ("revoked token", ("GET", "/status", None, ref.bearer(revoked)), 401, "revoked"),
        ("unknown user's token", ("GET", "/status", None, ref.bearer(mint("ghost", "user"))), 401, "no longer exists"),
        ("unscoped token", ("GET", "/status", None, ref.bearer(mint("admin", ""))), 403, "cannot"),
        ("worker token on /status", ("GET", "/status", None, ref.bearer(worker_token)), 403, "worker"),
        ("worker token makes workloads", ("POST", "/workloads", None, ref.bearer(worker_token)), 403, "worker"),
        ("worker token logs out", ("DELETE", "/logout", None, ref.bearer(worker_token)), 403, "worker"),
        ("old worker token uploads", up({"workload_id": wid}, [("data", "1.png", png)], ref.bearer(worker_token)), 403, "worker"),
        ("forged job capability", ("GET", f"/images/0?workload_id={wid}", None, ref.bearer("job.e30." + "0" * 64)), 401, "capability"),
        ("garbage job capability", ("GET", f"/images/0?workload_id={wid}", None, ref.bearer("job.%%%.x")), 401, "capability"),
        ("user uploads a result", up({"workload_id": wid, "type": "filtered", "image_id": "0"}, [("data", "0.png", png)]), 403, "workers"),
        ("wrong password", ("GET", "/login", None, basic("admin", "nope")), 401, "wrong user name or password"),
        ("no credentials", ("GET", "/login", None, {}), 401, "Basic"),
        ("credentials not base64", ("GET", "/login", None, {"Authorization": "Basic %%%"}), 401, "malformed"),
        ("credentials without colon", ("GET", "/login", None, {"Authorization": "Basic " + base64.b64encode(b"admin").decode()}), 401, "malformed"),
        # -- workloads
        ("unknown filter", ("POST", "/workloads?filter=posterize", None, auth), 400, "unknown filter"),
        ("name traversal", ("POST", "/workloads?workload_name=../../etc", None, auth), 400, "workload_name"),
        ("name with a slash", ("POST", "/workloads", b"workload_name=a%2Fb", {**auth, "Content-Type": "application/x-www-form-urlencoded"}), 400, "workload_name"),
        ("name is dot-dot", ("POST", "/workloads?workload_name=..", None, auth), 400, "workload_name"),
        ("name too long", ("POST", "/workloads?workload_name=" + "n" * 65, None, auth), 400, "workload_name"),
        ("name with NUL", ("POST", "/workloads", json.dumps({"workload_name": "a\u0000b"}).encode(), json_h), 400, "workload_name"),
        ("JSON not an object", ("POST", "/workloads", b"[1, 2]", json_h), 400, "object"),
        ("malformed JSON", ("POST", "/workloads", b'{"filter": ', json_h), 400, "JSON"),
        ("body not UTF-8", ("POST", "/workloads", b"\xff\xfe\xfd", {**auth, "Content-Type": "application/x-www-form-urlencoded"}), 400, "UTF-8"),
        ("huge JSON body", ("POST", "/workloads", b'{"x": "' + b"a" * 2_000_000 + b'"}', json_h), 413, "too large"),
        ("name in use", ("POST", "/workloads?workload_name=before", None, auth), 409, "in use"),
        ("unknown workload", ("GET", "/workloads/nope", None, auth), 404, "not found"),
        ("someone else's workload", ("GET", f"/workloads/{wid}", None, ref.bearer(mallory)), 404, "not found"),
        ("someone else's jobs", ("GET", f"/workloads/{wid}/jobs", None, ref.bearer(mallory)), 404, "not found"),
        # -- uploads
        ("upload as JSON", ("POST", "/images", b"{}", json_h), 415, "multipart"),
        ("upload without a file", up({"workload_id": wid}, []), 400, "no image"),
        ("broken multipart", ("POST", "/images", b"--xXx-boundary-xXx\r\nnonsense", {**auth, "Content-Type": "multipart/form-data; boundary=xXx-boundary-xXx"}), 400, "malformed"),
        ("empty file", up({"workload_id": wid}, [("data", "e.png", b"")]), 400, "empty"),
        ("text file", up({"workload_id": wid}, [("data", "t.png", b"hello, I am not a picture at all")]), 400, "not an image"),
        ("executable", up({"workload_id": wid}, [("data", "x.png", b"\x7fELF" + b"\x00" * 100)]), 400, "not an image"),
        ("truncated header", up({"workload_id": wid}, [("data", "h.png", png[:20])]), 400, "broken header"),
        ("too large", up({"workload_id": wid}, [("data", "big.png", png + b"\x00" * MAX_UPLOAD)]), 413, "limit"),
        ("decompression bomb", up({"workload_id": wid}, [("data", "bomb.png", png_header_only(60000, 60000))]), 400, "pixels"),
        ("no workload_id", up({}, [("data", "1.png", png)]), 400, "workload_id"),
        ("someone else's workload upload", up({"workload_id": wid}, [("data", "1.png", png)], ref.bearer(mallory)), 404, "not found"),
        ("bogus type", up({"workload_id": wid, "type": "thumbnail"}, [("data", "1.png", png)]), 400, "type"),
        ("two files", up({"workload_id": wid}, [("data", "1.png", png), ("image", "2.png", png)]), 400, "one image"),
        ("old worker token stores a result", up({"workload_id": wid, "type": "filtered", "image_id": "0"}, [("data", "1.png", png)], ref.bearer(worker_token)), 403, "worker"),
        # -- downloads and listing
        ("id not a number", ("GET", f"/images/abc?workload_id={wid}", None, auth), 400, "integer"),
        ("negative id", ("GET", f"/images/-1?workload_id={wid}", None, auth), 400, "negative"),
        ("no workload_id", ("GET", "/images/0", None, auth), 400, "workload_id"),
        ("unknown image", ("GET", f"/images/999?workload_id={wid}", None, auth), 404, "not found"),
        ("filtered not there", ("GET", f"/images/0?workload_id={other_wid}&type=filtered", None, auth), 404, "not found"),
        ("someone else's image", ("GET", f"/images/0?workload_id={wid}", None, ref.bearer(mallory)), 404, "not found"),
        ("someone else's listing", ("GET", f"/images?workload_id={wid}", None, ref.bearer(mallory)), 404, "not found"),
        ("listing without workload", ("GET", "/images", None, auth), 400, "workload_id"),
        # -- routing
        ("PUT /status", ("PUT", "/status", None, auth), 405, "not allowed"),
        ("DELETE /images/0", ("DELETE", "/images/0", None, auth), 405, "not allowed"),
        ("PATCH /login", ("PATCH", "/login", None, {}), 405, "not allowed"),
        ("unknown route", ("GET", "/admin/secrets", None, auth), 404, "no such endpoint"),
        ("path traversal route", ("GET", "/images/../../etc/passwd", None, auth), 404, ""),
    ]
    assert len(table) >= 40
    failures = []
    for name, (method, path, body, headers), status, words in table:
        r = ref.request(url, method, path, body, headers)
        text = r.body.decode("utf-8", "replace")
        ok = r.status == status and r.headers.get("content-type", "").startswith("application/json")
        ok = ok and "Traceback" not in text and words.lower() in text.lower()
        if status == 405:
            ok = ok and "allow" in r.headers
        if not ok:
            failures.append(f"{name}: got {r.status} {text[:200]}")
    assert not failures, "\n".join(failures)

    # -- nng: garbage at the controller and at the worker is dropped, never fatal
    rpc = next(w["rpc_address"] for w in ref.get_json(url, token, "/status")["workers"])
    junk = [os.urandom(200), b'{"type": "heartbeat", "v": 1, "na', b'{"type": "heartbeat", "v": 2}',
            b'{"type": "welcome", "v": 1}', b"null", os.urandom(10 * 1024 * 1024)]
    with pynng.Pub0(dial=f"tcp://{system.controller}") as pub:
        publish_until_dropped(pub, junk[:-1], url)  # each counted as dropped, not merely sent
        send_oversized(pub, junk[-1])  # the 10 MB one: the controller hangs up on it
    for blob in junk:
        with pynng.Req0(dial=rpc, send_timeout=2000, recv_timeout=2000) as req:
            try:
                req.send(blob)
                assert b'"ok":false' in req.recv()
            except pynng.Timeout:
                assert len(blob) > 1_000_000  # only the oversized one is dropped silently

    # -- afterwards: still serving (the controller takes the worker's next heartbeat), and
    # nothing stored before has changed
    seen = ref.get_json(url, token, "/status")["workers"][0]["last_seen"]
    wait_until(lambda: ref.get_json(url, token, "/status")["workers"][0]["last_seen"] > seen, 30,
               "a heartbeat of the worker's after the garbage")
    assert {w["name"]: w["alive"] for w in ref.get_json(url, token, "/status")["workers"]} == {"w": True}
    wid2 = workload(url, token)
    after = {i: frame_png(20 + i, 50, 30) for i in range(3)}
    push(system, token, wid2, after)
    wait_completed(url, token, wid2)
    check_filtered(system, token, wid2, after)
    for p, data in stored_before.items():
        assert p.read_bytes() == data, f"{p} changed"
    assert not list(Path(system.data_dir, "incoming").iterdir()), "half-received uploads left behind"
    with Image.open(io.BytesIO(ref.pull(url, token, wid, 0, "original").body)) as im:
        assert im.size == (60, 40)
