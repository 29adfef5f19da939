"""Helpers for the tests that drive a real system: workloads, uploads, checks of the results."""

from __future__ import annotations

import asyncio
import base64
import io
import sqlite3
import time

import aiohttp

from PIL import Image

from scripts.localsys import LocalSystem, wait_until
from scripts.frames import frame_png
from tests import refclient as ref
from tests.conftest import ADMIN_PASSWORD


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



def push(system: LocalSystem, token: str, wid: str, frames: dict[int, bytes]) -> None:
    """Upload frames one by one, as the reference's stress client does; each must be accepted."""
    for i, data in frames.items():
        r = ref.upload(system.url, token, wid, f"{i}.png", data)
        assert r.status == 200, r.body


# -- async: for tests that run impersonated workers in their own event loop -------------

async def until(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = await cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


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
