"""Nothing lost: worker and server crashes, graceful stops, fairness, garbage on the sockets."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time

import pynng

from tests.helpers import (
    SLOW,
    check_filtered,
    frame_png,
    job_rows,
    publish_until_dropped,
    push,
    ref,
    send_oversized,
    slow,
    view,
    wait_completed,
    wait_until,
    workload,
)

# -- must-show 1: a worker killed mid-way ------------------------------------------------------

def test_kill_9_of_a_worker_mid_workload_loses_nothing(make_system):
    system = make_system("--hedge", "off")  # the retry path, not a hedge, must rescue the jobs
    token = system.start_workers({"a": SLOW, "b": SLOW})
    wid = workload(system.url, token)
    frames = {i: frame_png(i, 96, 64) for i in range(40)}
    push(system, token, wid, frames)
    wait_until(lambda: len(view(system.url, token, wid)["filtered_images"]) >= 8, 60, "8 results")
    # a runs jobs (its own telemetry; a 150 ms job's dispatch is counted with its result, not
    # written while it runs)
    wait_until(lambda: next(w for w in ref.get_json(system.url, token, "/status")["workers"]
                            if w["name"] == "a")["running_jobs"] > 0, 30, "a running jobs")
    system.workers["a"].kill()  # SIGKILL: no goodbye, jobs in flight on it are lost
    system.workers["a"].wait()
    wait_completed(system.url, token, wid)
    check_filtered(system, token, wid, frames)
    rows = job_rows(system, wid)
    assert all(state == "done" for _, state, _, _ in rows)
    assert any(attempts > 1 for _, _, attempts, _ in rows), "no job was retried after the kill"
    # (its jobs went back in line as its session's connection dropped: before its heartbeats'
    # silence made it dead)
    wait_until(lambda: {w["name"]: w["alive"] for w in ref.get_json(system.url, token, "/status")["workers"]}
               == {"a": False, "b": True}, 10, "a declared dead")


# -- must-show 2: the server killed mid-workload ------------------------------------------------

def test_kill_9_of_the_server_mid_workload_loses_no_accepted_upload(make_system):
    system = make_system()
    token = system.start_workers({"a": SLOW, "b": SLOW})
    wid = workload(system.url, token)
    accepted: dict[int, bytes] = {}
    frames = [frame_png(i, 96, 64) for i in range(60)]
    sent = {"n": 0}
    stop = threading.Event()

    def stress_push() -> None:  # like the stress client: one by one, errors ignored, keeps going
        i = 0
        while i < len(frames) and not stop.is_set():
            try:
                r = ref.upload(system.url, token, wid, f"{i}.png", frames[i])
            except OSError:
                time.sleep(0.05)  # the stress client's retry pace while the server is down, no sync
                continue  # server down: try this frame again
            if r.status == 200:
                accepted[r.json()["image_id"]] = frames[i]
                i += 1
            sent["n"] = i

    pusher = threading.Thread(target=stress_push)
    pusher.start()
    try:
        wait_until(lambda: len(accepted) >= 20, 60, "20 accepted uploads")
        system.server.kill()  # SIGKILL, mid-upload and mid-processing
        system.server.wait()
        wait_until(lambda: ports_free(system.port, system.controller_port), 10, "the killed server's ports")
        system.start_server()  # same ports, same data dir; the workers are left alone
        pusher.join(120)
    finally:
        stop.set()
        pusher.join()
    assert len(accepted) == 60  # every frame was accepted once the server was back
    # If the kill fell between an upload's commit and its reply, the client sent that frame again:
    # it is then stored twice, once under an id the client never saw. Nothing is ever lost.
    count = wait_completed(system.url, token, wid)["images"]
    assert count in (60, 61) and set(accepted) <= set(range(count))
    for i, data in accepted.items():  # every accepted original, under its id, intact
        assert ref.pull(system.url, token, wid, i, "original").body == data
    stored = {i: ref.pull(system.url, token, wid, i, "original").body for i in range(count)}
    check_filtered(system, token, wid, stored)
    status = ref.get_json(system.url, token, "/status")
    assert {w["name"] for w in status["workers"] if w["alive"]} == {"a", "b"}


def ports_free(*ports: int) -> bool:
    """Each port can be listened on again (with SO_REUSEADDR, as the server does)."""
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


# -- graceful stop ---------------------------------------------------------------------------

def test_sigterm_drains_a_worker_then_it_leaves(make_system):
    # A TTL far beyond the waits below: a worker that leaves within them left by its goodbye.
    system = make_system("--hedge", "off", "--worker-ttl", "120")
    token = system.start_workers({"a": slow(2000), "b": slow(2000)})
    wid = workload(system.url, token)
    frames = {i: frame_png(i, 64, 64) for i in range(12)}
    push(system, token, wid, frames)

    def a_running() -> int:  # a's own telemetry (at most a heartbeat old; jobs take 2 s)
        return next(w for w in ref.get_json(system.url, token, "/status")["workers"]
                    if w["name"] == "a")["running_jobs"]

    def held_by(name: str) -> set[int]:  # (a dispatch is written once its job has run 0.25 s)
        return {i for i, s, _, w in job_rows(system, wid) if w == name and s == "dispatched"}

    wait_until(lambda: a_running() == 2 and len(held_by("a")) >= 2, 30, "two jobs running on worker a")
    held_by_a = held_by("a")
    assert system.stop_worker("a") == 0  # SIGTERM: finish what it runs, say goodbye, exit 0
    rows = {i: (s, n, w) for i, s, n, w in job_rows(system, wid)}
    finished_by_a = {i for i in held_by_a if rows[i] == ("done", 1, "a")}
    # What it ran, it finished; a job sent ahead and still waiting there for a slot (at most its
    # --prefetch, 1 for 2 slots) it gave back as it began to drain: done elsewhere, below.
    assert len(finished_by_a) >= 2 and len(held_by_a - finished_by_a) <= 1, (held_by_a, rows)
    wait_until(lambda: not {w["name"]: w["alive"] for w in
                            ref.get_json(system.url, token, "/status")["workers"]}["a"], 30,
               "a to leave by its goodbye (its 120 s TTL cannot have run out)")
    wait_completed(system.url, token, wid)
    check_filtered(system, token, wid, frames)


def test_a_second_signal_stops_a_worker_at_once_and_its_jobs_go_elsewhere(make_system):
    system = make_system("--hedge", "off")  # the retry path, not a hedge, must rescue the job
    token = system.start_workers({"a": slow(5000)})
    wid = workload(system.url, token)
    assert ref.upload(system.url, token, wid, "0.png", frame_png(0, 64, 64)).status == 200
    # Running on a (its own telemetry says so), not merely marked dispatched.
    wait_until(lambda: ref.get_json(system.url, token, "/status")["workers"][0]["running_jobs"] == 1,
               30, "the job to run on a")
    proc = system.workers["a"]
    proc.send_signal(signal.SIGTERM)  # the first: drain
    # The second, repeated until it exits: two signals before its handler ran count as one.
    wait_until(lambda: proc.send_signal(signal.SIGTERM) or proc.poll() is not None, 10, "worker a to exit")
    assert proc.returncode == 1  # the second signal's exit; a drain waits for its 5 s job and exits 0
    system.workers.pop("a")
    system.start_worker("b")
    wait_completed(system.url, token, wid)
    _, state, attempts, worker = job_rows(system, wid)[0]
    assert (state, worker) == ("done", "b") and attempts >= 2  # a's attempt was lost, then retried


# -- must-show 4: fairness -----------------------------------------------------------------

def test_a_small_workload_is_not_starved_by_a_huge_one(make_system):
    system = make_system()
    # Slow enough (4 slots x 250 ms: 16 images/s, whatever the machine's cores) that the big one
    # piles up a queue.
    token = system.start_workers({"a": (*slow(250), "--capacity", "2"), "b": (*slow(250), "--capacity", "2")})
    big, small = workload(system.url, token), workload(system.url, token)
    tiny = frame_png(1, 32, 32)
    for i in range(200):
        assert ref.upload(system.url, token, big, f"{i}.png", tiny).status == 200
    for i in range(5):
        assert ref.upload(system.url, token, small, f"{i}.png", tiny).status == 200
    wait_completed(system.url, token, small)
    big_done = len(view(system.url, token, big)["filtered_images"])
    assert big_done <= 100, f"the small workload waited for {big_done} of the big one's 200 images"


# -- must-show 5: garbage on the sockets -----------------------------------------------------

def test_garbage_on_controller_and_worker_sockets_is_dropped(make_system):
    system = make_system()
    token = system.start_workers({"a": ()})
    rpc = next(w["rpc_address"] for w in ref.get_json(system.url, token, "/status")["workers"])
    rng = random.Random(7)
    junk = [
        bytes(rng.randrange(256) for _ in range(300)),
        b'{"type": "heartbeat", "v": 1, "name": "evil", "sess',
        b'{"type": "heartbeat", "v": 99, "name": "future"}',
        b'{"type": "run_job", "v": 1}',
        os.urandom(10 * 1024 * 1024),
    ]
    with pynng.Pub0(dial=f"tcp://{system.controller}") as pub:
        # Counted as dropped (bad_messages), not merely sent; the 10 MB one is hung up on.
        publish_until_dropped(pub, junk[:-1], system.url)
        send_oversized(pub, junk[-1])
    replies = []
    for blob in junk:
        with pynng.Req0(dial=rpc, send_timeout=2000, recv_timeout=2000) as req:
            try:
                req.send(blob)
                replies.append(req.recv())
            except pynng.Timeout:
                replies.append(None)  # dropped (the 10 MB one exceeds recv_max_size)
    assert all(r is None or b'"ok":false' in r for r in replies), replies
    assert sum(r is not None for r in replies) >= 4
    # Both still serve: the controller takes a's next heartbeat, and a filters a workload.
    seen = ref.get_json(system.url, token, "/status")["workers"][0]["last_seen"]
    wait_until(lambda: ref.get_json(system.url, token, "/status")["workers"][0]["last_seen"] > seen, 30,
               "a heartbeat of a's after the garbage")
    names = {w["name"]: w["alive"] for w in ref.get_json(system.url, token, "/status")["workers"]}
    assert names == {"a": True}
    wid = workload(system.url, token)
    frames = {i: frame_png(i, 48, 32) for i in range(3)}
    push(system, token, wid, frames)
    wait_completed(system.url, token, wid)
    check_filtered(system, token, wid, frames)
