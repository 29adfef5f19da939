"""The worker plane against a hostile network: crafted bytes at the controller and at a worker,
forged and replayed jobs and cancels, a rogue process that joins as a worker, a worker that lies
about its results, and the bounds on membership. Real server, real workers, real nng."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import secrets
import socket
import threading
import time

import aiohttp
import pytest
import psutil
import pynng
from PIL import Image

from plane import localjoin, seal, wire
from tests.fakeworker import FakeWorker, Telemetry
from tests.helpers import (
    Api,
    check_filtered,
    frame_png,
    has_workers,
    job_rows,
    metric,
    plane_dropped,
    publish_until_dropped,
    push,
    ref,
    until,
    wait_completed,
    wait_until,
    welcomed,
    workload,
)
from plane.stream import StreamClosed, read_frame, write_frame
from worker.service import Worker, WorkerSettings


def hostile_blobs() -> list[bytes]:
    """Bytes that once stopped the controller or a worker's RPC, and their relatives."""
    hello = {"v": wire.VERSION, "type": "hello", "name": "x", "session": "ab", "rpc_address": "tcp://127.0.0.1:1"}
    return [
        b'{"v": 3, "type": "hello", "name": "x", "session": ' + b"9" * 5000 + b"}",
        b"[" * 100_000,
        b'{"v": 3, "type": "sealed", "kid": "join", "seq": 1, "body": "{}", "mac": "\xc3\xa9' + b"a" * 62 + b'"}',
        json.dumps({**hello, "session": "é" * 10}).encode(),
        json.dumps({**hello, "name": "n" * 200_000}).encode(),
        b'{"v": 3, "type": "heartbeat", "name": "x", "session": "ab", "cpu_percent": NaN}',
        b'{"v": 3, "type": "heartbeat", "name": "x", "session": "ab", "cpu_percent": Infinity}',
        json.dumps({"v": 3, "type": "sealed", "kid": "ffff", "seq": 1, "body": "{}", "mac": "0" * 64}).encode(),
        json.dumps({"v": 3, "type": "sealed", "kid": "join", "seq": 2**80, "body": "{}", "mac": "0" * 64}).encode(),
        json.dumps({"v": 3, "type": "run_job", "job_id": 1, "workload_id": "w", "image_id": 0,
                    "filter": "blur", "attempt": 1}).encode(),
        json.dumps({"v": 3, "type": "cancel_job", "job_id": 1}).encode(),
        json.dumps({"v": 3, "type": "goodbye", "name": "w", "session": "ab"}).encode(),
        os.urandom(300),
        b"null",
        # the binary envelope, cut short, garbled, or lying about its lengths
        wire.MAGIC,
        wire.MAGIC + os.urandom(300),
        wire.MAGIC + b"\x00" * 16 + b"\x04join" + b"\x00" * 8 + b"\x01" * 16 + b"\xff\xff" + b"\xff" * 4,
        wire.MAGIC + b"\x00" * 16 + b"\x04join" + b"\x00" * 24 + b"\x00\x01" + b"\x00\x00\x00\x02"
        + b"\x7f\xff\xff\xff" + b"{}",
    ]


def test_hostile_bytes_stop_nothing_and_bloat_nothing(make_system):
    system = make_system("--hedge", "off")
    token = system.start_workers({"w": ("--capacity", "2")})
    rpc = next(w["rpc_address"] for w in ref.get_json(system.url, token, "/status")["workers"])
    server = psutil.Process(system.server.pid)
    rss_before = server.memory_info().rss
    log = system.log_dir / "server.log"
    log_before = log.stat().st_size

    blobs = hostile_blobs()
    # Hellos from a thousand different names and dead addresses: joins must stay bounded.
    hellos = [wire.encode(wire.Hello(f"ghost{i}", secrets.token_hex(16), addr))
              for i in range(1000) for addr in ("tcp://127.0.0.1:9", "tcp://%%%")[i % 2:][:1]]
    with pynng.Pub0(dial=f"tcp://{system.controller}") as pub:
        target = len(blobs) * 20
        # pub/sub drops what is sent before the connection is up: send until counted
        wait_until(lambda: [pub.send(b) for b in blobs] and plane_dropped(system.url) >= target, 30,
                   "the controller to count the hostile messages")
        for h in hellos:
            pub.send(h)
    # A worker's RPC: more garbage than it has serving contexts (capacity*4+8), each answered.
    for blob in blobs * 3:
        with pynng.Req0(dial=rpc, send_timeout=3000, recv_timeout=3000) as req:
            req.send(blob)
            reply = wire.decode(req.recv())
            assert isinstance(reply, wire.Ack) and not reply.ok

    # Everything still works: the worker is alive, a workload completes, nothing failed.
    wait_until(lambda: system.alive_workers(token) == {"w"}, 10, "the worker to stay alive")
    wid = workload(system.url, token)
    frames = {i: frame_png(i, 40, 30) for i in range(6)}
    push(system, token, wid, frames)
    wait_completed(system.url, token, wid)
    check_filtered(system, token, wid, frames)
    assert all(row[1] == "done" and row[2] == 1 for row in job_rows(system, wid))
    names = {w["name"] for w in ref.get_json(system.url, token, "/status")["workers"]}
    assert names == {"w"}, "a hello alone must never make a member"
    for w in ref.get_json(system.url, token, "/status")["workers"]:
        json.dumps(w, allow_nan=False)  # nothing a browser's JSON.parse would choke on
    # Bounded: a few lines of log and a few MB, not one per message.
    assert log.stat().st_size - log_before < 30_000, "refusals must be logged at a bounded rate"
    assert server.memory_info().rss - rss_before < 60 * 1024 * 1024


async def test_a_rogue_joiner_reads_only_what_it_was_sent(make_system):
    """A process that joins as a worker (here with the join token this machine's workers find):
    all it gets is a capability for each job it is sent, and that dies with its session."""
    system = make_system("--hedge", "off", "--inline-max-bytes", "0")  # images over HTTP, with capabilities
    rogue = await FakeWorker("rogue", system.controller, Telemetry(capacity=1)).start()
    try:
        async with aiohttp.ClientSession() as http:
            api = Api(http, system.url)
            await api.login()
            await until(lambda: has_workers(api, {"rogue"}), 20, "the rogue to join")
            wid, other = await api.workload(), await api.workload()
            for i in range(2):
                await api.upload(wid, i)
            await api.upload(other, 0)
            await until(lambda: _has_jobs(rogue, 1), 10, "a job for the rogue")
            job = rogue.jobs[0]
            cap = {"Authorization": f"Bearer {job.capability}"}
            mine = job.image_id
            async with aiohttp.ClientSession(headers=cap) as r:
                async def status(method: str, path: str, **params) -> int:
                    async with r.request(method, f"{system.url}{path}", params=params) as resp:
                        return resp.status

                assert await status("GET", f"/images/{mine}", workload_id=wid) == 200
                assert await status("GET", f"/images/{1 - mine}", workload_id=wid) == 404
                assert await status("GET", "/images/0", workload_id=other) == 404
                assert await status("GET", f"/images/{mine}", workload_id=wid, size="small") == 404
                assert await status("GET", "/images", workload_id=wid) in (401, 403)
                assert await status("GET", "/status") in (401, 403)
                assert await status("POST", "/workloads") in (401, 403)
                # a forged or altered capability is worth nothing
                forged = {"Authorization": f"Bearer {job.capability[:-4]}0000"}
                async with r.get(f"{system.url}/images/{mine}", params={"workload_id": wid},
                                 headers=forged) as resp:
                    assert resp.status == 401
                # once the rogue's session ends, so does its capability
                rogue._pub.close()
                await until(lambda: _gone(api, "rogue"), 20, "the rogue to be declared dead")
                assert await status("GET", f"/images/{mine}", workload_id=wid) == 401
    finally:
        await rogue.close()


async def _has_jobs(fake: FakeWorker, n: int) -> bool:
    return len(fake.jobs) >= n


async def _gone(api: Api, name: str) -> bool:
    return name not in await api.alive()


def test_forged_jobs_and_a_cancel_storm_change_nothing(make_system):
    system = make_system("--hedge", "off")
    token = system.start_workers({"w": ("--capacity", "2", "--slow-rate", "1", "--slow-ms", "150")})
    rpc = next(w["rpc_address"] for w in ref.get_json(system.url, token, "/status")["workers"])
    wid = workload(system.url, token, filter="grayscale")
    stop = threading.Event()
    replies: list[tuple[str, wire.Message]] = []

    def storm() -> None:
        with pynng.Req0(dial=rpc, send_timeout=2000, recv_timeout=2000) as req:
            n = 0
            while not stop.is_set():
                n += 1
                key = secrets.token_bytes(32)
                msgs = {
                    "cancel": wire.encode(wire.CancelJob(n % 50)),
                    "tied cancel": wire.encode(wire.CancelJob(n % 50, if_not_started=True, tie="ab" * 16)),
                    "run": wire.encode(wire.RunJob(n % 50, wid, 0, "blur", 1, capability="job.x.y")),
                    "sealed cancel": wire.join(seal.seal_with(key, "0f0f", seal.C2W, n, wire.Exchange(cancels=[n % 50]))),
                    "sealed job": wire.join(seal.seal_with(key, "0f0f", seal.C2W, n, wire.Exchange(
                        [wire.RunJob(n % 50, wid, 0, "blur", 1, payload=b"\x89PNG")]))),
                }
                for kind, data in msgs.items():
                    req.send(data)
                    replies.append((kind, wire.decode(req.recv())))

    t = threading.Thread(target=storm)
    t.start()
    try:
        frames = {i: frame_png(i, 40, 30) for i in range(8)}
        push(system, token, wid, frames)
        wait_completed(system.url, token, wid)
    finally:
        stop.set()
        t.join(10)
    check_filtered(system, token, wid, frames)  # grayscale, each its own: no forged blur stored
    assert all(row[1] == "done" and row[2] == 1 for row in job_rows(system, wid)), job_rows(system, wid)
    # Refused, all of them; a tied cancel with a made-up tie waits (bounded) for a copy of that
    # tie, which never comes.
    assert {kind for kind, _ in replies} == {"cancel", "tied cancel", "run", "sealed cancel", "sealed job"}
    assert all(isinstance(r, wire.Ack) and (kind == "tied cancel" or (not r.ok and "refused" in r.error))
               for kind, r in replies), [r for r in replies if r[1].ok]


async def test_a_replayed_heartbeat_is_refused(make_system):
    system = make_system()
    fake = await FakeWorker("f", system.controller, Telemetry()).start()
    try:
        async with aiohttp.ClientSession() as http:
            api = Api(http, system.url)
            await api.login()
            await until(lambda: has_workers(api, {"f"}), 20, "the fake to join")
            captured = [d for d in fake.sent if b'"kid":"join"' not in d and b'"hello"' not in d]
            assert captured, "a sealed heartbeat"
            before = plane_dropped(system.url)
            with pynng.Pub0(dial=f"tcp://{system.controller}") as pub:
                await until(lambda: _send_and_count(pub, captured[-1], system, before), 10,
                            "the replay to be refused")
    finally:
        await fake.close()


async def _send_and_count(pub: pynng.Pub0, data: bytes, system, before: float) -> bool:
    pub.send(data)
    return metric(system.url, "dpip_worker_plane_refused") > before


async def test_a_worker_refuses_replays_and_strangers(tmp_path):
    """A real Worker in this process, welcomed by the test acting as its server."""
    settings = WorkerSettings(controller_host="127.0.0.1", controller_port=9, name="solo", capacity=1,
                              advertise_host="127.0.0.1", join_token="the-join-token")
    worker = Worker(settings)
    await worker.start()
    try:
        join = seal.join_key("the-join-token")
        kid = seal.new_key()[0]
        key = seal.session_key(join, "e1", worker.session, kid)
        welcome = wire.Welcome("e1", worker.session, kid, "", 8080, "http://127.0.0.1:9", 1.0)
        welcome = dataclasses.replace(welcome, proof=seal.welcome_proof(join, welcome))
        with pynng.Req0(dial=worker.rpc_address, send_timeout=3000, recv_timeout=3000) as req:
            async def ask(data: bytes) -> bytes:
                await req.asend(data)
                return await req.arecv()

            stranger = wire.Welcome("e2", "cd" * 16, "1f1f", "22" * 32, 1, "", 1.0)
            assert "welcome refused" in wire.decode(await ask(wire.encode(stranger))).error
            # our own session, but a key in clear and no proof: anyone who saw the hello could
            in_clear = wire.Welcome("e3", worker.session, "2f2f", "33" * 32, 1, "", 1.0)
            assert "welcome refused" in wire.decode(await ask(wire.encode(in_clear))).error
            ours = seal.Channel(key, kid, send=seal.C2W, recv=seal.W2C)
            joined = ours.open_reply(await ask(wire.encode(welcome)), 0)
            assert isinstance(joined, wire.Joined), "taken, sealed with the new key"
            assert {"grayscale", "blur", "resize"} <= {f.name for f in joined.filters}, "with the filters it runs"
            # an exchange is for the session's own connection, never the RPC port
            data, _ = ours.seal(wire.Exchange(cancels=[7]))
            assert "session connection" in wire.decode(await ask(wire.join(data))).error
        assert worker.refused == 3

        async def read(reader) -> wire.Message:
            msg, fresh = ours.open(wire.decode(await asyncio.wait_for(read_frame(reader), 10), wire.MAX_SESSION_BYTES))
            assert fresh
            return msg

        # The session: on its own connection, each message sealed and fresh.
        reader, writer = await asyncio.open_connection("127.0.0.1", joined.session_port)
        parts, _ = ours.seal(wire.Exchange(cancels=[7]))
        write_frame(writer, parts)  # a cancel of a job it never had: stopped at once
        results = await read(reader)
        assert isinstance(results, wire.Results) and results.stopped == [7] and results.batch == 1
        job = wire.RunJob(8, "w", 0, "grayscale", 1, payload=b"not an image")
        parts, _ = ours.seal(wire.Exchange([job], acks=[1]))
        write_frame(writer, parts)
        (ended,) = (await read(reader)).results
        assert ended.job_id == 8 and not ended.ok and not ended.retryable, "an image it cannot decode"
        write_frame(writer, parts)  # the same bytes again: the connection is closed, nothing run
        with pytest.raises(StreamClosed):
            await asyncio.wait_for(read_frame(reader), 10)
        writer.close()
        assert worker._sessions.refused == 1 and len(worker.jobs) == 0
        # another key, or nothing sealed at all: refused at the first message
        other_key = seal.Channel(secrets.token_bytes(32), kid, send=seal.C2W, recv=seal.W2C)
        for data in (wire.join(other_key.seal(wire.Exchange(cancels=[7]))[0]), wire.encode(wire.Exchange())):
            reader, writer = await asyncio.open_connection("127.0.0.1", joined.session_port)
            write_frame(writer, [data])
            with pytest.raises(StreamClosed):
                await asyncio.wait_for(read_frame(reader), 10)
            writer.close()
        assert worker._sessions.refused == 3
    finally:
        await worker.close()


async def _one_job_for(api: Api, fake: FakeWorker) -> str:
    """Log in, wait for ``fake`` to join, give it a workload of one image; the workload's id
    once the job is with it (held until released)."""
    await api.login()
    await until(lambda: has_workers(api, {fake.name}), 20, f"{fake.name} to join")
    wid = await api.workload()
    await api.upload(wid, 0)
    await until(lambda: _has_jobs(fake, 1), 10, f"{fake.name}'s job")
    return wid


async def _retried_by_an_honest_worker(system, bad: FakeWorker, inline: str = "") -> tuple[dict, dict, bytes]:
    """``bad`` gets the one image's job and answers it its way; the retry goes to an honest
    worker that joins meanwhile. The workload's final view, its job row and the stored result."""
    honest = None
    try:
        async with aiohttp.ClientSession() as http:
            api = Api(http, system.url)
            wid = await _one_job_for(api, bad)
            honest = await FakeWorker("honest", system.controller, Telemetry(capacity=1, cpu_percent=90),
                                      inline=inline).start()
            await until(lambda: has_workers(api, {bad.name, "honest"}), 20, "the honest worker")
            honest.release_all()
            bad.release_all()
            await until(lambda: _has_jobs(honest, 1), 20, "the retry on the honest worker")
            honest.release_all()
            view = await until(lambda: _completed(api, wid), 20, "the workload")
            async with http.get(f"{system.url}/workloads/{wid}/jobs") as r:
                (job,) = await r.json()
            async with http.get(f"{system.url}/images/0", params={"workload_id": wid, "type": "filtered"}) as r:
                result = await r.read()
            assert honest.uploads == 0, "its result came back with the job's end, not over HTTP"
            return view, job, result
    finally:
        await bad.close()
        if honest is not None:
            await honest.close()


async def test_ok_without_a_stored_result_is_a_failed_attempt(make_system):
    system = make_system("--hedge", "off")
    liar = await FakeWorker("liar", system.controller, Telemetry(capacity=1), lie=True).start()
    view, job, _ = await _retried_by_an_honest_worker(system, liar)  # the liar says "done", stored nothing
    assert view["filtered_images"] == [0] and view["failed_images"] == []
    assert job["attempts"] == 2 and job["worker"] == "honest"


async def test_small_images_travel_inline_and_a_wrong_inline_result_is_refused(make_system):
    """A small original goes with its job and its result comes back in the reply; a result that
    cannot be the job's (a colour image for grayscale) is refused like a bad upload would be."""
    system = make_system("--hedge", "off")
    wrong = await FakeWorker("wrong", system.controller, Telemetry(capacity=1), inline="wrong").start()
    view, job, result = await _retried_by_an_honest_worker(system, wrong, inline="yes")
    assert wrong.jobs[0].payload == frame_png(0, 32, 32), "the original travelled with its job"
    assert wrong.jobs[0].inline_result == wire.INLINE_MAX_BYTES
    assert view["filtered_images"] == [0] and view["failed_images"] == []
    assert job["attempts"] == 2 and job["worker"] == "honest"
    with Image.open(io.BytesIO(result)) as im:
        assert im.mode == "L", "the stored result is the honest, grayscale one"
    assert wrong.uploads == 0, "no HTTP upload: it replied inline"


async def _completed(api: Api, wid: str):
    v = await api.view(wid)
    return v if v["status"] == "completed" else None


async def test_membership_is_bounded_and_forgets_the_dead(make_system):
    system = make_system("--max-workers", "2", "--forget-after", "1")
    fakes = [await FakeWorker(f"f{i}", system.controller, Telemetry()).start() for i in range(2)]
    extra = None
    try:
        async with aiohttp.ClientSession() as http:
            api = Api(http, system.url)
            await api.login()
            await until(lambda: has_workers(api, {"f0", "f1"}), 20, "two workers")
            before = metric(system.url, "dpip_worker_plane_refused")
            extra = await FakeWorker("f2", system.controller, Telemetry()).start()
            await until(lambda: _refused_more(system, before), 10, "the third to be refused")
            assert await _names(http, system) == {"f0", "f1"}
            await fakes[0].close()  # dies, then is forgotten, which makes room for f2
            await until(lambda: _names_are(http, system, {"f1", "f2"}), 30, "f0 forgotten, f2 in")
            await until(lambda: welcomed(extra), 10, "f2 welcomed")
    finally:
        for f in [*fakes[1:], *([extra] if extra else [])]:
            await f.close()


async def _refused_more(system, before: float) -> bool:
    return metric(system.url, "dpip_worker_plane_refused") > before


async def _names(http: aiohttp.ClientSession, system) -> set[str]:
    async with http.get(f"{system.url}/status") as r:
        return {w["name"] for w in (await r.json())["workers"]}


async def _names_are(http, system, names: set[str]) -> bool:
    return await _names(http, system) == names


def test_rpc_addresses_are_for_the_admin_only(make_system):
    import subprocess
    import sys

    from tests.helpers import ROOT, clean_env

    system = make_system()
    token = system.start_workers({"w": ()})
    env = {**clean_env(), "DPIP_PASSWORD": "bob-password-1"}
    subprocess.run([sys.executable, "main.py", "users", "--data-dir", str(system.data_dir), "add", "bob"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=60)
    bob = ref.login(system.url, "bob", "bob-password-1")
    (seen_by_bob,) = ref.get_json(system.url, bob, "/status")["workers"]
    (seen_by_admin,) = ref.get_json(system.url, token, "/status")["workers"]
    assert "rpc_address" not in seen_by_bob and seen_by_admin["rpc_address"].startswith("tcp://")
    assert time.time() - seen_by_bob["last_seen"] < 60


# -- a local process without credentials (issue 21, items 7 and 8) --------------------------

async def test_a_local_process_without_the_join_token_never_joins_and_holds_no_name(make_system):
    """Loopback default, no --join-token: a process that does not have the token this machine's
    workers find (another user's) is refused, whatever capacity it claims and whatever name it
    takes; the real worker of that name joins and does the work."""
    system = make_system("--hedge", "off")
    squatter = await FakeWorker("w1", system.controller, Telemetry(capacity=4096), join_token=None).start()
    try:
        await until(lambda: _refused(system, 3), 20, "the controller to refuse the hellos")
        system.start_worker("w1")
        token = system.login()
        system.wait_workers({"w1"}, token)
        wid = workload(system.url, token)
        frames = {i: frame_png(i, 32, 32) for i in range(3)}
        push(system, token, wid, frames)
        wait_completed(system.url, token, wid)
        check_filtered(system, token, wid, frames)
        assert squatter.token == "" and squatter.jobs == []
    finally:
        await squatter.close()


async def _refused(system, n: int) -> bool:
    return plane_dropped(system.url) >= n


def test_the_local_join_token_is_the_users_only(make_system):
    system = make_system()
    path = localjoin.token_path(system.controller_port)
    assert path.read_text().strip() == (system.data_dir / "join-token").read_text().strip()
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert (system.data_dir / "join-token").stat().st_mode & 0o777 == 0o600


async def test_one_workers_cannot_decode_is_checked_by_another(make_system):
    """A worker that answers "no retry can help" to every job fails nothing for good: the job
    goes to another worker, which does it."""
    system = make_system("--hedge", "off")
    refuser = await FakeWorker("refuser", system.controller, Telemetry(capacity=1), refuse=True).start()
    view, job, _ = await _retried_by_an_honest_worker(system, refuser)
    assert view["filtered_images"] == [0] and view["failed_images"] == []
    assert job["attempts"] == 2 and job["worker"] == "honest"


async def test_metadata_a_worker_puts_in_a_result_is_never_stored(make_system):
    """A worker adds EXIF (a made-up GPS position) and a text chunk to the results it uploads
    and to those it returns inline: what is stored and served has neither, pixels unchanged."""
    system = make_system("--hedge", "off")
    for inline in ("", "yes"):
        liar = await FakeWorker(f"liar{inline}", system.controller, Telemetry(capacity=1), inline=inline,
                                metadata=True).start()
        try:
            async with aiohttp.ClientSession() as http:
                api = Api(http, system.url)
                wid = await _one_job_for(api, liar)
                liar.release_all()
                view = await until(lambda: _completed(api, wid), 20, "the workload")
                assert view["filtered_images"] == [0]
                async with http.get(f"{system.url}/images/0", params={"workload_id": wid, "type": "filtered"}) as r:
                    result = await r.read()
        finally:
            await liar.close()
        with Image.open(io.BytesIO(result)) as im:
            assert dict(im.getexif()) == {} and "exif" not in im.info and "Comment" not in im.info
            assert im.tobytes() == Image.open(io.BytesIO(frame_png(0, 32, 32))).convert("L").tobytes()
        assert b"eXIf" not in result and b"tEXt" not in result


def test_hellos_never_make_the_controller_dial_a_third_party(make_system):
    """Unsealed hellos, and hellos sealed with the join token but naming an address on another
    host than their own, are refused: a plain TCP listener they name is never dialled."""
    system = make_system()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.0)
    target = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    join = seal.join_key((system.data_dir / "join-token").read_text().strip())
    blobs = [wire.encode(wire.Hello(f"u{i}", "ab" * 16, target)) for i in range(3)]
    blobs += [wire.join(seal.seal_with(join, seal.JOIN, seal.W2C, i + 1,
                                       wire.Hello(f"s{i}", "cd" * 16, f"tcp://10.255.{i}.1:9"))) for i in range(3)]
    # Then a good hello naming a second listener: once that one is dialled, the controller has
    # handled the hellos before it (in order), so a dial they caused would have come by then.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    probe.listen(8)
    probe.settimeout(0.0)
    good = wire.join(seal.seal_with(join, seal.JOIN, seal.W2C, 99, wire.Hello(
        "probe", "ef" * 16, f"tcp://127.0.0.1:{probe.getsockname()[1]}")))
    with pynng.Pub0(dial=f"tcp://{system.controller}") as pub:
        publish_until_dropped(pub, blobs, system.url)

        def probe_dialled() -> bool:
            pub.send(good)
            try:
                probe.accept()[0].close()
                return True
            except BlockingIOError:
                return False

        wait_until(probe_dialled, 30, "the controller to dial the good hello's address", interval=0.2)
    try:
        listener.accept()
        dialled = True
    except BlockingIOError:
        dialled = False
    listener.close()
    probe.close()
    assert not dialled, "the controller dialled the address an unsealed hello named"


def test_welcomes_in_all_are_bounded(monkeypatch):
    """However many names hellos come with, at most WELCOME_RATE welcomes start a second."""
    from controller import membership as m

    class NoStore:
        async def known_workers(self):
            return []

    members = m.Membership(NoStore(), b"s" * 32, 8080, "", join_token="t")  # type: ignore[arg-type]
    now = 1000.0
    started = sum(members._take_welcome_budget(now) for _ in range(500))
    assert started == int(m.WELCOME_RATE)
    assert members._take_welcome_budget(now + 0.5) and sum(
        members._take_welcome_budget(now + 0.5) for _ in range(100)) == int(m.WELCOME_RATE / 2) - 1


# -- the session's framing (plane.stream.FrameConnection) -----------------------------------------

class _Transport:
    """What FrameConnection asks of a transport, recorded."""

    def __init__(self) -> None:
        self.paused = self.aborted = False
        self.written: list[bytes] = []

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted

    def writelines(self, parts) -> None:
        self.written += [bytes(p) for p in parts]

    def close(self) -> None:
        self.aborted = True


def _fed(connection, data: bytes, cuts: list[int]) -> None:
    """``data`` given to the protocol as a socket would, in pieces of the sizes in ``cuts``
    (cycled), each no larger than the buffer it offers."""
    at, i = 0, 0
    while at < len(data):
        buffer = connection.get_buffer(-1)
        n = min(len(buffer), cuts[i % len(cuts)], len(data) - at)
        assert n > 0, "the protocol offered an empty buffer"
        buffer[:n] = data[at:at + n]
        connection.buffer_updated(n)
        at, i = at + n, i + 1


@pytest.mark.parametrize("cuts", [[1], [3, 5], [4096], [70_000, 1], [1 << 20]])
async def test_frames_cut_anywhere_come_out_whole_and_in_order(cuts):
    from plane.stream import BIG_FRAME, STAGE_BYTES, FrameConnection

    sizes = [0, 1, 3, 4, 100, BIG_FRAME - 1, BIG_FRAME, STAGE_BYTES - 4, STAGE_BYTES + 1, 1_500_000, 7, 2]
    frames = [os.urandom(n) for n in sizes]
    connection = FrameConnection(max_bytes=2_000_000)
    connection.connection_made(_Transport())
    _fed(connection, b"".join(len(f).to_bytes(4, "big") + f for f in frames), cuts)
    assert [bytes(await connection.read()) for _ in frames] == frames


async def test_a_frame_over_the_limit_closes_the_connection_before_any_of_it_is_held():
    from plane.stream import FrameConnection

    connection = FrameConnection(max_bytes=1000)
    transport = _Transport()
    connection.connection_made(transport)
    _fed(connection, (5).to_bytes(4, "big") + b"hello" + (1001).to_bytes(4, "big") + b"x" * 10, [4096])
    assert await connection.read() == b"hello", "what came whole before it is still delivered"
    with pytest.raises(StreamClosed, match="1001 bytes"):
        await connection.read()
    assert transport.aborted and connection._big is None


async def test_a_length_announced_is_not_memory_taken_before_its_bytes_come():
    """A peer that announces the largest frame allowed and sends nothing more holds one piece
    (PIECE_BYTES), not the frame's size; as the bytes come, pieces follow them."""
    from plane.stream import PIECE_BYTES, FrameConnection

    connection = FrameConnection()
    connection.connection_made(_Transport())
    size = wire.MAX_SESSION_BYTES
    _fed(connection, size.to_bytes(4, "big") + b"x" * 1000, [4096])
    assert connection._big is not None and sum(len(p) for p in connection._big) <= PIECE_BYTES
    _fed(connection, b"y" * (3 * PIECE_BYTES), [1 << 20])
    assert sum(len(p) for p in connection._big) <= 4 * PIECE_BYTES, "pieces follow what arrived"


async def test_a_connection_cut_mid_frame_says_so_and_a_reader_that_falls_behind_pauses_the_socket():
    from plane.stream import MAX_QUEUED, FrameConnection

    connection = FrameConnection()
    transport = _Transport()
    connection.connection_made(transport)
    _fed(connection, b"".join((1).to_bytes(4, "big") + b"x" for _ in range(MAX_QUEUED)), [4096])
    assert transport.paused, "reading stops while the session is behind"
    for _ in range(MAX_QUEUED // 2 + 1):
        assert await connection.read() == b"x"
    assert not transport.paused
    _fed(connection, (10).to_bytes(4, "big") + b"abc", [4096])
    connection.connection_lost(None)
    for _ in range(MAX_QUEUED // 2 - 1):
        assert await connection.read() == b"x"
    with pytest.raises(StreamClosed):
        await connection.read()


async def test_frames_over_a_real_socket_in_odd_pieces():
    """A loopback TCP connection: a sender writing frames in odd pieces (its header cut too),
    the receiving end a FrameConnection made by a real event loop's server."""
    from plane.stream import FrameConnection

    frames = [os.urandom(n) for n in (10, 1_200_000, 3, 70_000, 0, 500)]
    data = b"".join(len(f).to_bytes(4, "big") + f for f in frames)
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[FrameConnection] = loop.create_future()

    def accept() -> FrameConnection:
        connection = FrameConnection()
        accepted.set_result(connection)
        return connection

    server = await loop.create_server(accept, "127.0.0.1", 0)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        for at in range(0, len(data), 99_991):
            writer.write(data[at:at + 99_991])
            await writer.drain()
        connection = await asyncio.wait_for(accepted, 10)
        got = [bytes(await asyncio.wait_for(connection.read(), 10)) for _ in frames]
        assert got == frames
        writer.close()
        with pytest.raises(StreamClosed):
            await asyncio.wait_for(connection.read(), 10)
    finally:
        server.close()
