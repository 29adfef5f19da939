"""Placement against the real server, with impersonated workers on real nng sockets."""

from __future__ import annotations

import aiohttp
import pytest

from plane import wire
from tests.fakeworker import FakeWorker, Telemetry
from tests.helpers import Api, completed, has_workers, jobs_placed, until, welcomed


@pytest.fixture
async def fakes():
    """Impersonated workers, always closed (an open nng socket at loop close hangs the exit)."""
    made: list[FakeWorker] = []
    yield made
    for f in made:
        await f.close()
        if f.beat_errors:  # shown with a failure's captured output
            print(f"fake worker {f.name}: heartbeats that failed: {f.beat_errors}")


async def test_jobs_go_where_the_score_says_and_tags_wait(make_system, fakes):
    # The fakes beat in this test's event loop, which the test itself may starve: a long TTL, so
    # that a late heartbeat never gets one declared dead (and its held jobs placed again).
    system = make_system("--worker-ttl", "10")
    idle = await FakeWorker("idle", system.controller, Telemetry(cpu_percent=5, memory_percent=10)).start()
    fakes.append(idle)
    busy = await FakeWorker("busy", system.controller, Telemetry(cpu_percent=90, memory_percent=80)).start()
    fakes.append(busy)
    full = await FakeWorker("full", system.controller,
                            Telemetry(cpu_percent=1, memory_percent=1, running_job_ids=[9001, 9002])).start()
    fakes.append(full)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        api = Api(http, system.url)
        await api.login()
        await until(lambda: has_workers(api, {"idle", "busy", "full"}), 30, "three fake workers alive in /status")
        await until(lambda: welcomed(*fakes), 30, "the three fake workers to be welcomed")
        wid = await api.workload()
        # One at a time, so each placement sees the previous one's slot taken.
        expected = ["idle", "idle", "busy", "busy"]
        by_name = {f.name: f for f in fakes}
        for i, name in enumerate(expected):
            await api.upload(wid, i)
            await until(lambda n=i + 1: jobs_placed(fakes, n), 30, f"job {i} to be placed on a fake worker")
            assert i in by_name[name].job_ids(), f"job {i} should have gone to {name}"
        assert [idle.job_ids(), busy.job_ids(), full.job_ids()] == [[0, 1], [2, 3], []]
        # Everybody is full now: the fifth waits, and the workload says why.
        await api.upload(wid, 4)
        v = await until(lambda: _waiting(api, wid), 30, "the workload to say why job 4 waits")
        assert "full" in v["waiting_reason"] and v["status"] == "running"
        assert full.job_ids() == []
        idle.release_all()  # idle gets room first: job 4 goes there, busy is still full
        await until(lambda: jobs_placed(fakes, 5), 30, "job 4 to be placed once idle has room")
        assert idle.job_ids() == [0, 1, 4] and busy.job_ids() == [2, 3]
        idle.release_all()
        busy.release_all()
        v = await until(lambda: completed(api, wid), 30, "the workload to complete")
        assert v["filtered_images"] == [0, 1, 2, 3, 4] and full.job_ids() == []

        # A workload that needs a tag nobody has waits, visibly, then runs on the tagged one.
        tagged = await api.workload(tags="gpu")
        await api.upload(tagged, 0)
        v = await until(lambda: _waiting(api, tagged), 30, "the tagged workload to say why it waits")
        # The reason is the scheduler's, from a placement it tried: nobody untagged took the job.
        assert v["status"] == "scheduling" and "gpu" in v["waiting_reason"]
        assert sum(len(f.jobs) for f in fakes) == 5
        gpu = await FakeWorker("gpu-box", system.controller,
                               Telemetry(cpu_percent=99, memory_percent=99, tags=["gpu"],
                                         gpu=wire.Gpu(1, 10.0, 5.0))).start()
        fakes.append(gpu)
        await until(lambda: jobs_placed([gpu], 1), 30, "the tagged job to reach gpu-box")
        gpu.release_all()
        v = await until(lambda: completed(api, tagged), 30, "the tagged workload to complete")
        assert v["filtered_images"] == [0] and v["waiting_reason"] is None
        assert sum(len(f.jobs) for f in fakes if f is not gpu) == 5  # nobody untagged ever took it


async def _waiting(api: Api, wid: str):
    v = await api.view(wid)
    return v if v.get("waiting_reason") else None
