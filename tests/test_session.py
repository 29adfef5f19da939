"""The worker plane's session (issue 33): jobs out and results back in batches over one sealed
exchange, results redone after a crash lost them, workers of another protocol version refused.
Real server and worker processes; the outbox's rules also against an in-memory model."""

from __future__ import annotations

import asyncio
import io
import json
import random
from concurrent.futures import ThreadPoolExecutor

import pynng
from PIL import Image

from plane import wire
from tests.helpers import (
    check_filtered,
    frame_png,
    job_rows,
    metric,
    plane_dropped,
    push,
    ref,
    view,
    wait_completed,
    wait_until,
    workload,
)
from worker.outbox import Outbox


def test_jobs_queued_before_a_worker_joins_leave_together_and_come_back_whole(make_system):
    """Twelve jobs wait for a worker; when it joins, the jobs it is trusted with leave in one
    exchange, their ends come back in batches, and every result is the right image."""
    system = make_system("--hedge", "off")
    token = system.login()
    wid = workload(system.url, token)
    frames = {i: frame_png(i, 48, 32) for i in range(12)}
    push(system, token, wid, frames)  # queued: no worker yet
    system.start_workers({"w": ("--capacity", "4", "--slow-rate", "1", "--slow-ms", "50")})
    wait_completed(system.url, token, wid)
    check_filtered(system, token, wid, frames)
    plane = ref.get_json(system.url, token, "/status")["worker_plane"]
    assert plane["jobs_sent"] == 12 and plane["results_received"] == 12, plane
    # The first placement pass sends the four trusted jobs in one message, and ends that come
    # together share one: fewer messages than jobs each way.
    assert plane["jobs_per_message"] > 1 and plane["result_batches"] < plane["results_received"], plane
    assert all(state == "done" and attempts == 1 for _, state, attempts, _ in job_rows(system, wid))


def test_jobs_sent_as_their_uploads_commit_leave_nothing_when_the_commit_fails(make_system):
    """Each small upload's job leaves for a worker while the upload's row is being committed.
    Ten uploads race for a quota three fit: those refused in their transaction (413) had their
    jobs sent already; none of those leaves a row, a result, a file or a job in line, and the
    workload ends with the three accepted, each filtered once and whole."""
    system = make_system("--quota-bytes", "1380000", "--hedge", "off")
    token = system.start_workers({"w": ("--capacity", "8")})
    wid = workload(system.url, token)
    rng = random.Random(7)
    frames = []
    for _ in range(10):  # incompressible: 360 KB each, their grayscale results 120 KB
        buf = io.BytesIO()
        Image.frombytes("RGB", (346, 346), rng.randbytes(346 * 346 * 3)).save(buf, "PNG", compress_level=1)
        frames.append(buf.getvalue())
    # whatever the order: the third fits beside two others and two results, a fourth never
    assert all(355_000 < len(f) < 365_000 for f in frames)
    with ThreadPoolExecutor(10) as threads:
        answers = list(threads.map(lambda i: ref.upload(system.url, token, wid, f"{i}.png", frames[i]), range(10)))
    accepted = {a.json()["image_id"]: frames[i] for i, a in enumerate(answers) if a.status == 200}
    assert sorted(a.status for a in answers) == [200] * 3 + [413] * 7, [a.status for a in answers]
    wait_completed(system.url, token, wid)
    check_filtered(system, token, wid, accepted)
    assert [(image, state, attempts) for image, state, attempts, _ in job_rows(system, wid)] == \
        [(image, "done", 1) for image in sorted(accepted)]
    name = view(system.url, token, wid)["workload_name"]
    filtered = system.data_dir / "images" / name / "filtered"
    assert sorted(int(f.stem) for f in filtered.iterdir()) == sorted(accepted)
    status = ref.get_json(system.url, token, "/status")
    assert status["queued_jobs"] == 0 and status["scheduler"]["jobs_done"] == 3, status


def test_a_result_a_crash_lost_is_made_again_from_its_original(make_system):
    """Results are written unsynced: after kill -9 of the server, one whose file did not make it
    to disk (here: truncated, and the stamp saying what is on disk set back) has its job run
    again at the next start, and the stored result is whole."""
    system = make_system("--hedge", "off")
    token = system.start_workers({"w": ()})
    wid = workload(system.url, token)
    frames = {i: frame_png(i, 40, 30) for i in range(4)}
    push(system, token, wid, frames)
    wait_completed(system.url, token, wid)
    name = view(system.url, token, wid)["workload_name"]
    assert system.server is not None
    system.server.kill()
    system.server.wait()
    lost = system.data_dir / "images" / name / "filtered" / "2.png"
    lost.write_bytes(lost.read_bytes()[:20])  # what a power cut can leave of an unsynced file
    (system.data_dir / "incoming.results-synced").write_text("0.0")  # nothing known on disk
    system.start_server()
    token = system.login()
    wait_until(lambda: lost.exists() and lost.stat().st_size > 20, 60, "the lost result to be made again")
    wait_completed(system.url, token, wid)
    check_filtered(system, token, wid, frames)
    attempts = {image: n for image, _, n, _ in job_rows(system, wid)}
    assert attempts[2] == 2 and all(n == 1 for image, n in attempts.items() if image != 2), attempts


def test_a_worker_of_the_previous_protocol_is_refused_saying_so(make_system):
    """A hello of protocol version 2 (the worker plane before sessions) is refused and counted,
    never welcomed; the refusal names both versions (in the log, at a bounded rate)."""
    system = make_system()
    token = system.login()
    old = json.dumps({"v": 2, "type": "hello", "name": "old", "session": "ab" * 16,
                      "rpc_address": "tcp://127.0.0.1:9"}).encode()
    before = plane_dropped(system.url)
    with pynng.Pub0(dial=f"tcp://{system.controller}") as pub:
        def refused() -> bool:
            pub.send(old)
            return metric(system.url, "dpip_worker_plane_refused") > 0
        wait_until(refused, 20, "the old hello to be refused")
    assert plane_dropped(system.url) > before
    assert all(w["name"] != "old" for w in ref.get_json(system.url, token, "/status")["workers"])


# -- the outbox, in memory ----------------------------------------------------------------------

def _result(job_id: int, size: int = 0) -> wire.JobResult:
    return wire.JobResult(job_id, ok=True, payload=b"x" * size)


async def test_the_oldest_exchange_waiting_takes_every_end_ready():
    box = Outbox()
    first = asyncio.create_task(box.take(5.0))
    second = asyncio.create_task(box.take(5.0))
    await asyncio.sleep(0)
    box.put(_result(1))
    box.put(_result(2))
    got = await first
    assert [r.job_id for r in got.results] == [1, 2] and got.batch == 1
    assert not second.done(), "the newer exchange waits for the next ends"
    box.stopped(3)
    got = await second
    assert got.stopped == [3] and got.batch == 2 and not got.results


async def test_an_unacknowledged_batch_goes_again_on_a_new_connection_and_an_acknowledged_one_never():
    box = Outbox()
    box.put(_result(1))
    assert (await box.take(1.0)).batch == 1
    box.put(_result(2))
    assert [r.job_id for r in (await box.take(1.0)).results] == [2]
    box.ack([2])
    assert box.waiting() == 1  # batch 1 is not acknowledged
    box.resend_unacked()  # a new connection: the old one may have lost it
    again = await box.take(1.0)
    assert [r.job_id for r in again.results] == [1] and again.batch == 3
    box.ack([3])
    assert box.waiting() == 0
    box.resend_unacked()
    assert (await box.take(0.01)).batch == 0, "nothing left to send"


async def test_a_batch_holds_at_most_its_byte_budget_but_always_one_result():
    box = Outbox()
    big = wire.BATCH_BYTES // 2 + 1
    for i in range(3):
        box.put(_result(i, big))
    sizes = [len((await box.take(1.0)).results) for _ in range(3)]
    assert sizes == [1, 1, 1]
    box.put(_result(9, wire.BATCH_BYTES * 2))  # larger than the budget alone: still goes
    assert [r.job_id for r in (await box.take(1.0)).results] == [9]
