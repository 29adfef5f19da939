"""Placement against the real server, with impersonated workers on real nng sockets."""

from __future__ import annotations

import asyncio
import base64
import time

import aiohttp
import pytest

from common import wire
from scripts.frames import frame_png
from tests.conftest import ADMIN_PASSWORD
from tests.fakeworker import FakeWorker, Telemetry


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


@pytest.fixture
async def fakes():
    """Impersonated workers, always closed (an open nng socket at loop close hangs the exit)."""
    made: list[FakeWorker] = []
    yield made
    for f in made:
        await f.close()


async def test_jobs_go_where_the_score_says_and_tags_wait(make_system, fakes):
    system = make_system()
    idle = await FakeWorker("idle", system.controller, Telemetry(cpu_percent=5, memory_percent=10)).start()
    fakes.append(idle)
    busy = await FakeWorker("busy", system.controller, Telemetry(cpu_percent=90, memory_percent=80)).start()
    fakes.append(busy)
    full = await FakeWorker("full", system.controller,
                            Telemetry(cpu_percent=1, memory_percent=1, running_job_ids=[9001, 9002])).start()
    fakes.append(full)
    async with aiohttp.ClientSession() as http:
        api = Api(http, system.url)
        await api.login()
        await until(lambda: _has(api, {"idle", "busy", "full"}), 20, "three fake workers")
        await until(lambda: _all_welcomed(fakes), 10, "welcomes")
        wid = await api.workload()
        # One at a time, so each placement sees the previous one's slot taken.
        expected = ["idle", "idle", "busy", "busy"]
        by_name = {f.name: f for f in fakes}
        for i, name in enumerate(expected):
            await api.upload(wid, i)
            await until(lambda n=i + 1: _total_jobs(fakes, n), 10, f"job {i} to be placed")
            assert i in by_name[name].job_ids(), f"job {i} should have gone to {name}"
        assert [idle.job_ids(), busy.job_ids(), full.job_ids()] == [[0, 1], [2, 3], []]
        # Everybody is full now: the fifth waits, and the workload says why.
        await api.upload(wid, 4)
        v = await until(lambda: _waiting(api, wid), 10, "a waiting reason")
        assert "full" in v["waiting_reason"] and v["status"] == "running"
        assert full.job_ids() == []
        idle.release_all()  # idle gets room first: job 4 goes there, busy is still full
        await until(lambda: _total_jobs(fakes, 5), 10, "job 4 to be placed")
        assert idle.job_ids() == [0, 1, 4] and busy.job_ids() == [2, 3]
        idle.release_all()
        busy.release_all()
        v = await until(lambda: _completed(api, wid), 20, "the workload to complete")
        assert v["filtered_images"] == [0, 1, 2, 3, 4] and full.job_ids() == []

        # A workload that needs a tag nobody has waits, visibly, then runs on the tagged one.
        tagged = await api.workload(tags="gpu")
        await api.upload(tagged, 0)
        v = await until(lambda: _waiting(api, tagged), 10, "a waiting reason")
        assert v["status"] == "scheduling" and "gpu" in v["waiting_reason"]
        await asyncio.sleep(0.5)
        assert sum(len(f.jobs) for f in fakes) == 5  # nobody untagged took it
        gpu = await FakeWorker("gpu-box", system.controller,
                               Telemetry(cpu_percent=99, memory_percent=99, tags=["gpu"],
                                         gpu=wire.Gpu(1, 10.0, 5.0))).start()
        fakes.append(gpu)
        await until(lambda: _total_jobs([gpu], 1), 20, "the tagged job to reach gpu-box")
        gpu.release_all()
        v = await until(lambda: _completed(api, tagged), 20, "the tagged workload")
        assert v["filtered_images"] == [0] and v["waiting_reason"] is None


async def _has(api: Api, names: set[str]) -> bool:
    return names <= await api.alive()


async def _all_welcomed(fakes) -> bool:
    return all(f.token for f in fakes)


async def _total_jobs(fakes, n: int) -> bool:
    return sum(len(f.jobs) for f in fakes) >= n


async def _waiting(api: Api, wid: str):
    v = await api.view(wid)
    return v if v.get("waiting_reason") else None


async def _completed(api: Api, wid: str):
    v = await api.view(wid)
    return v if v["status"] == "completed" else None
