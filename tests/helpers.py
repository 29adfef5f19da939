"""The one library of the tests: what two or more test modules use goes here (a helper used by
one module stays in it; fixtures are conftest's). Tests reach the harness (``harness/``: the
reference's client, the frames, the local system's launcher) through this module, not directly.

Waiting is always on a condition with a deadline: :func:`wait_until` (sync) or :func:`until`
(async; ``cond`` sync or async), both ``(cond, timeout, what)``.
"""

from __future__ import annotations

import asyncio
import os
import base64
import inspect
import io
import socket
import sqlite3

from typing import NoReturn

import aiohttp
import pytest
import pynng
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from harness import refclient as ref
from harness.frames import frame_png
from harness.localsys import ROOT, LocalSystem, clean_env, free_port, wait_until

__all__ = ["ROOT", "LocalSystem", "clean_env", "frame_png", "free_port", "ref", "wait_until"]  # and all below

ADMIN_PASSWORD = "test-admin-pw"




def png_bytes(width: int = 64, height: int = 48, colour=(200, 100, 50), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


def png(colour: tuple[int, int, int], size=(160, 120)) -> bytes:
    """A plain PNG of one colour (default 160x120)."""
    return png_bytes(size[0], size[1], colour)


# -- the in-process app (aiohttp's test client) ---------------------------------------------

def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(client, user="admin", password=ADMIN_PASSWORD) -> str:
    r = await client.get("/login", headers=basic(user, password))
    assert r.status == 200
    return (await r.json())["token"]


async def new_workload(client, token, **params) -> dict:
    r = await client.post("/workloads", headers=bearer(token), data=params or None)
    assert r.status == 200, await r.text()
    return await r.json()


async def upload(client, token, workload_id, data, type_="original", field="data", extra=None):
    body, ctype = ref.multipart({"workload_id": workload_id, "type": type_, **(extra or {})},
                                field, "17.png", data)
    return await client.post("/images", data=body, headers={**bearer(token), "Content-Type": ctype})


async def assert_error(r, status: int, *words: str) -> dict:
    assert r.status == status, (r.status, await r.text())
    assert r.content_type == "application/json"
    body = await r.json()
    assert set(body) == {"error"} and body["error"]
    for w in words:
        assert w in body["error"], body
    return body


# -- a real system ------------------------------------------------------------------------


def slow(ms: int, rate: float = 1) -> tuple[str, ...]:
    """Worker flags: ``rate`` of its jobs wait ``ms`` before they start."""
    return ("--slow-rate", f"{rate:g}", "--slow-ms", str(ms))


SLOW = slow(150)


def workload(url: str, token: str, **params: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in params.items())
    r = ref.request(url, "POST", f"/workloads?{q}", headers=ref.bearer(token))
    assert r.status == 200, r.body
    return r.json()["workload_id"]


def view(url: str, token: str, wid: str) -> dict:
    return ref.get_json(url, token, f"/workloads/{wid}")


def wait_completed(url: str, token: str, wid: str, timeout: float = 120) -> dict:
    return wait_until(lambda: (v := view(url, token, wid))["status"] == "completed" and v,
                      timeout, f"workload {wid} to complete", interval=0.1)


def check_filtered(system: LocalSystem, token: str, wid: str, frames: dict[int, bytes]) -> None:
    """Every id filtered exactly once: one file each, the grayscale of its own original."""
    v = view(system.url, token, wid)
    assert v["filtered_images"] == sorted(frames) and v["failed_images"] == []
    folder = system.data_dir / "images" / v["workload_name"] / "filtered"
    assert sorted(int(p.stem) for p in folder.iterdir()) == sorted(frames)
    for i, data in frames.items():
        r = ref.pull(system.url, token, wid, i)
        with Image.open(io.BytesIO(r.body)) as got, Image.open(io.BytesIO(data)) as src:
            assert got.tobytes() == src.convert("L").tobytes(), f"image {i} is not its own result"


def job_rows(system: LocalSystem, wid: str) -> list[tuple]:
    with sqlite3.connect(system.data_dir / "dpip.sqlite3") as db:
        return db.execute("SELECT image_id, state, attempts, worker FROM jobs WHERE workload_id = ?"
                          " ORDER BY image_id", (wid,)).fetchall()


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the server's /metrics samples ``name`` whose labels include ``labels`` (0 if
    none yet: a labelled counter appears with its first event). /metrics is open on loopback."""
    text = ref.request(url, "GET", "/metrics").body.decode()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    if not any(s.name == name for s in samples) and not labels:
        raise AssertionError(f"no metric {name} in /metrics")
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def plane_dropped(url: str) -> float:
    """Worker-plane messages the controller refused or could not decode, from its counters."""
    return metric(url, "dpip_worker_plane_refused") + metric(url, "dpip_worker_plane_bad_messages")


def publish_until_dropped(pub: pynng.Pub0, blobs: list[bytes], url: str, timeout: float = 30) -> None:
    """Publish ``blobs`` to the controller, again and again, until its counters show that it
    dropped at least that many more messages: pub/sub loses what is sent before the connection
    is up, so a single send proves nothing. Every blob must be one the controller counts."""
    target = plane_dropped(url) + len(blobs)

    def sent_and_counted() -> bool:
        for blob in blobs:
            pub.send(blob)
        return plane_dropped(url) >= target

    wait_until(sent_and_counted, timeout, f"the controller to count {len(blobs)} dropped messages", interval=0.1)


def send_oversized(pub: pynng.Pub0, blob: bytes, timeout: float = 30) -> None:
    """Publish a message beyond the controller's size limit, re-sent until the controller has hung
    up on it: nng closes a connection that brings an oversized message, which the sender sees."""
    hung_up: list[pynng.Pipe] = []
    pub.add_post_pipe_remove_cb(hung_up.append)  # called on nng's thread

    def sent_and_refused() -> bool:
        if not hung_up and pub.pipes:
            pub.send(blob)
        return bool(hung_up)

    wait_until(sent_and_refused, timeout, "the controller to hang up on the oversized message", interval=0.2)


def push(system: LocalSystem, token: str, wid: str, frames: dict[int, bytes]) -> None:
    """Upload frames one by one, as the reference's stress client does; each must be accepted."""
    for i, data in frames.items():
        r = ref.upload(system.url, token, wid, f"{i}.png", data)
        assert r.status == 200, r.body


# -- async: for tests that run impersonated workers in their own event loop -------------

def unavailable(why: str) -> NoReturn:
    """A part of the machine a test needs is missing (an engine, root, namespaces): the test is
    skipped, saying why, except in CI (``CI=true``), where nothing may be left out silently:
    there it fails."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why} (CI=true: a test that cannot run here fails the run)", pytrace=False)
    pytest.skip(why)


async def until(cond, timeout: float, what: str, interval: float = 0.05):
    """Call ``cond()`` (awaiting it if it is async) until it returns something truthy, and return
    that; TimeoutError after ``timeout``, even if a call of ``cond`` itself hangs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = cond()
        if inspect.isawaitable(value):
            try:
                value = await asyncio.wait_for(value, max(0.1, deadline - loop.time()))
            except asyncio.TimeoutError:
                value = None
        if value:
            return value
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound the way the server binds it (SO_REUSEADDR) right now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def completed_with(system: LocalSystem, token: str, wid: str, images: int) -> bool:
    """Whether the workload is completed with ``images`` images."""
    view = system.get(f"/workloads/{wid}", token)
    return view["status"] == "completed" and view["images"] == images


class Api:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url

    async def login(self) -> None:
        auth = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
        async with self.http.get(f"{self.url}/login", headers={"Authorization": f"Basic {auth}"}) as r:
            token = (await r.json())["token"]
        self.http.headers["Authorization"] = f"Bearer {token}"

    async def workload(self, **params) -> str:
        async with self.http.post(f"{self.url}/workloads", data=params or None) as r:
            return (await r.json())["workload_id"]

    async def upload(self, wid: str, i: int) -> None:
        form = aiohttp.FormData({"workload_id": wid})
        form.add_field("data", frame_png(i, 32, 32), filename=f"{i}.png")
        async with self.http.post(f"{self.url}/images", data=form) as r:
            assert r.status == 200, await r.text()

    async def view(self, wid: str) -> dict:
        async with self.http.get(f"{self.url}/workloads/{wid}") as r:
            return await r.json()

    async def alive(self) -> set[str]:
        async with self.http.get(f"{self.url}/status") as r:
            return {w["name"] for w in (await r.json())["workers"] if w["alive"]}


async def has_workers(api: Api, names: set[str]) -> bool:
    return names <= await api.alive()

async def welcomed(*fakes) -> bool:
    return all(f.token for f in fakes)

async def jobs_placed(fakes, n: int) -> bool:
    return sum(len(f.jobs) for f in fakes) >= n

async def completed(api: Api, wid: str):
    v = await api.view(wid)
    return v if v["status"] == "completed" else None
