"""Tail-latency control: hedged and tied copies, the loser cancelled, one result per image."""

from __future__ import annotations

import io

import aiohttp
from PIL import Image

from scheduler.latency import LatencyTracker, size_class
from tests.fakeworker import FakeWorker, Telemetry
from tests.helpers import (
    Api,
    check_filtered,
    completed,
    frame_png,
    has_workers,
    jobs_placed,
    metric,
    push,
    ref,
    slow,
    until,
    wait_completed,
    wait_until,
    welcomed,
    workload,
)

INSTANT_HEDGE = ("--hedge", "hedged", "--hedge-floor-ms", "1", "--hedge-initial-ms", "1")


def test_latency_tracker_percentiles_by_size_class():
    t = LatencyTracker(window=100, min_samples=5)
    assert t.percentile(1000, 0.95) is None
    for ms in range(1, 101):
        t.record(1000, ms / 1000)
    assert t.percentile(1000, 0.95) == 0.096
    assert t.percentile(2_000_000, 0.95) is None  # another size class knows nothing yet
    assert size_class(1000) == size_class(60_000) < size_class(200_000) < size_class(2_000_000)


def test_one_worker_dropping_30_percent_of_jobs_still_completes(make_system):
    """--fail-rate drops jobs without any reply: hedging (or the timeout) must finish them."""
    system = make_system("--job-timeout", "5")
    # Jobs of 30 ms or more: uploads arriving one by one then find the first worker busy and
    # spread over all three (instant jobs all go to whichever reported the least CPU last).
    busy = ("--slow-rate", "1", "--slow-ms", "30")
    token = system.start_workers({"ok-1": busy, "ok-2": busy, "lossy": (*busy, "--fail-rate", "0.3")})
    wid = workload(system.url, token)
    frames: dict[int, bytes] = {}
    # The lossy worker gets few of the jobs (a dropped one holds its slot), and 30% of a few can
    # be none: push batches until a copy never did its work. A dropped copy is answered only when
    # cancelled (as not started) or never, so once seen, that count stays.
    for _ in range(10):
        batch = {i: frame_png(i, 48, 32) for i in range(len(frames), len(frames) + 30)}
        push(system, token, wid, batch)
        frames.update(batch)
        wait_completed(system.url, token, wid, timeout=90)
        stats = ref.get_json(system.url, token, "/status")["scheduler"]
        if stats["copies_started"] < stats["copies_sent"]:
            break
    check_filtered(system, token, wid, frames)
    jobs = ref.get_json(system.url, token, f"/workloads/{wid}/jobs")
    assert stats["copies_started"] < stats["copies_sent"], f"in {len(frames)} jobs, none dropped: {stats}"
    # ...and rescued: its job needed a second copy (a hedge, or a retry after the timeout).
    assert any(j["copies"] > 1 for j in jobs), [(j["worker"], j["copies"], j["attempts"]) for j in jobs]


def test_without_hedging_the_job_timeout_recovers_dropped_jobs(make_system):
    system = make_system("--hedge", "off", "--job-timeout", "1.5")
    token = system.start_workers({"ok": (), "lossy": ("--fail-rate", "0.5")})
    wid = workload(system.url, token)
    frames: dict[int, bytes] = {}
    for _ in range(10):  # batches until one was dropped (the lossy worker may get only a few)
        batch = {i: frame_png(i, 48, 32) for i in range(len(frames), len(frames) + 16)}
        push(system, token, wid, batch)
        frames.update(batch)
        wait_completed(system.url, token, wid, timeout=90)
        jobs = ref.get_json(system.url, token, f"/workloads/{wid}/jobs")
        if any(j["attempts"] > 1 for j in jobs):
            break
    check_filtered(system, token, wid, frames)
    assert all(j["copies"] == j["attempts"] for j in jobs)  # off: one copy per attempt
    for j in jobs:  # the timeline is in order
        assert j["queued_at"] <= j["dispatched_at"] <= j["finished_at"]
        assert j["started_at"] <= j["finished_at"] and j["process_ms"] > 0
    assert any(j["attempts"] > 1 for j in jobs), "no job was dropped and retried"


def test_hedged_loser_is_cancelled_before_it_does_the_work(make_system):
    system = make_system(*INSTANT_HEDGE)
    token = system.start_workers({"fast": (), "slow": slow(4000)})
    wid = workload(system.url, token)
    frames = {i: frame_png(i, 48, 32) for i in range(6)}
    for i, data in frames.items():  # one at a time: each gets hedged
        push(system, token, wid, {i: data})
        wait_completed(system.url, token, wid, timeout=30)
    check_filtered(system, token, wid, frames)
    jobs = ref.get_json(system.url, token, f"/workloads/{wid}/jobs")
    assert {j["worker"] for j in jobs} == {"fast"}
    stats = ref.get_json(system.url, token, "/status")["scheduler"]
    assert stats["hedge"] == "hedged" and stats["jobs_done"] == 6
    # Every job that went to "slow" was hedged onto "fast" and cancelled while still waiting.
    sent_to_slow = sum(j["copies"] - 1 for j in jobs)
    assert sent_to_slow >= 1
    wait_until(lambda: ref.get_json(system.url, token, "/status")["scheduler"]["copies_sent"]
               == 6 + sent_to_slow, 10, "the cancelled copies to answer")
    assert ref.get_json(system.url, token, "/status")["scheduler"]["copies_started"] == 6


def test_tied_copies_store_one_result_per_image(make_system):
    system = make_system("--hedge", "tied")
    token = system.start_workers({"a": (), "b": slow(1500, rate=0.5)})
    wid = workload(system.url, token)
    frames = {i: frame_png(i, 48, 32) for i in range(12)}
    for i, data in frames.items():  # one at a time, so both workers have room for two copies
        assert ref.upload(system.url, token, wid, f"{i}.png", data).status == 200
        wait_completed(system.url, token, wid, timeout=30)
    check_filtered(system, token, wid, frames)
    jobs = ref.get_json(system.url, token, f"/workloads/{wid}/jobs")
    assert all(j["copies"] == 2 for j in jobs)
    stats = ref.get_json(system.url, token, "/status")["scheduler"]
    assert stats["hedge"] == "tied" and stats["copies_sent"] == 24


async def test_a_hedged_pair_that_both_finish_stores_the_first_result_only(make_system):
    """Both copies do the whole job; the late one's upload must change nothing."""
    # Fakes beat in this test's own event loop, which the test may starve: a long TTL.
    system = make_system(*INSTANT_HEDGE, "--worker-ttl", "10")
    first = await FakeWorker("first", system.controller, Telemetry(cpu_percent=1)).start()
    late = await FakeWorker("late", system.controller, Telemetry(cpu_percent=50),
                            filter_override="inverted", ignore_cancels=True).start()
    try:
        async with aiohttp.ClientSession() as http:
            api = Api(http, system.url)
            await api.login()
            await until(lambda: has_workers(api, {"first", "late"}), 20, "two fake workers")
            await until(lambda: welcomed(first, late), 10, "welcomes")
            wid = await api.workload()
            await api.upload(wid, 0)
            await until(lambda: jobs_placed([first], 1), 10, "the first copy")
            await until(lambda: jobs_placed([late], 1), 10, "the hedged copy")
            first.release_all()
            v = await until(lambda: completed(api, wid), 20, "the result of the first copy")
            late.release_all()  # it ignores the cancel (a fake), finishes and sends another image
            await until(lambda: _late_discarded(system), 10, "the late copy's result to be dropped")
            assert late.finished == 1
            assert v["filtered_images"] == [0]
            async with http.get(f"{system.url}/images/0", params={"workload_id": wid, "type": "filtered"}) as r:
                stored = await r.read()
            src = Image.open(io.BytesIO(frame_png(0, 32, 32)))
            got = Image.open(io.BytesIO(stored))
            assert got.tobytes() == src.convert("L").tobytes()
            name = (await api.view(wid))["workload_name"]
            assert len(list((system.data_dir / "images" / name / "filtered").iterdir())) == 1
            async with http.get(f"{system.url}/workloads/{wid}/jobs") as r:
                assert (await r.json())[0]["copies"] == 2
    finally:
        await first.close()
        await late.close()


async def _late_discarded(system) -> bool:
    return metric(system.url, "dpip_job_results_discarded") >= 1
