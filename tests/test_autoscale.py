"""Elastic workers: the policy as a pure function, then the real server starting and retiring
real worker processes (locally, and through external commands)."""

from __future__ import annotations

import os
import sys
import threading
import time

import psutil
import pytest

from common.config import parse_range
from scheduler.autoscale import Decision, Fleet, Managed, Phase, ScalePolicy, decide
from tests.helpers import (
    check_filtered,
    frame_png,
    push,
    ref,
    wait_completed,
    wait_until,
    workload,
)

POLICY = ScalePolicy(minimum=0, maximum=3, idle_timeout=10, up_cooldown=2, down_cooldown=2, worker_capacity=2)


def fleet(now=100.0, queued=0, free=0, *managed: Managed) -> Fleet:
    return Fleet(now, queued, free, tuple(managed))


def alive(name: str, idle_since: float | None = None, capacity: int = 2) -> Managed:
    return Managed(name, Phase.ALIVE, 0.0, idle_since, capacity)


# -- the policy -------------------------------------------------------------------------------

def test_nothing_queued_nothing_launched():
    assert decide(fleet(), POLICY, -1e9, -1e9).action == "hold"


def test_the_first_request_launches_one_and_a_burst_up_to_the_maximum():
    assert decide(fleet(queued=1), POLICY, -1e9, -1e9) == Decision(
        "launch", "1 jobs queued, 0 free slots and 0 on their way: 1 short", count=1)
    assert decide(fleet(queued=60), POLICY, -1e9, -1e9).count == 3
    # two alive (full) and one launching: at the maximum
    launching = Managed("c", Phase.LAUNCHING, 99.0)
    d = decide(fleet(100, 60, 0, alive("a"), alive("b"), launching), POLICY, -1e9, -1e9)
    assert d.action == "hold" and "maximum of 3" in d.reason


def test_slots_on_their_way_count_and_launches_are_rate_limited():
    launching = Managed("a", Phase.LAUNCHING, 99.0)
    assert decide(fleet(100, 2, 0, launching), POLICY, -1e9, -1e9).action == "hold"  # its 2 slots will do
    assert decide(fleet(100, 3, 0, launching), POLICY, -1e9, -1e9).count == 1
    d = decide(fleet(100, 3, 0, launching), POLICY, last_up=99.0, last_down=-1e9)
    assert d.action == "hold" and "cooling down" in d.reason
    assert decide(fleet(100, 5, 5), POLICY, -1e9, -1e9).action == "hold"  # free slots will take them


def test_idle_workers_retire_one_at_a_time_down_to_the_minimum():
    a, b = alive("a", idle_since=80.0), alive("b", idle_since=85.0)
    d = decide(fleet(100, 0, 4, a, b), POLICY, -1e9, -1e9)
    assert (d.action, d.name) == ("retire", "a") and "idle for 20 s" in d.reason
    assert decide(fleet(100, 0, 4, a, b), POLICY, -1e9, last_down=99.0).action == "hold"
    assert decide(fleet(100, 0, 4, alive("a", idle_since=95.0)), POLICY, -1e9, -1e9).action == "hold"  # not yet
    assert decide(fleet(100, 0, 4, alive("a", idle_since=None)), POLICY, -1e9, -1e9).action == "hold"  # busy
    keep_one = ScalePolicy(minimum=1, maximum=3, idle_timeout=10, worker_capacity=2)
    assert decide(fleet(100, 0, 2, a), keep_one, -1e9, -1e9).action == "hold"
    assert decide(fleet(100, 1, 0, a, b), POLICY, -1e9, -1e9).action != "retire"  # work waits: keep them


def test_the_minimum_respects_the_launch_cooldown():
    keep_one = ScalePolicy(minimum=1, maximum=3, up_cooldown=2, worker_capacity=2)
    assert decide(fleet(), keep_one, last_up=99.5, last_down=-1e9).action == "hold"


def test_minimum_is_kept_and_retiring_workers_do_not_count():
    keep_two = ScalePolicy(minimum=2, maximum=3, worker_capacity=2)
    assert decide(fleet(), keep_two, -1e9, -1e9) == Decision(
        "launch", "0 autoscaled workers, below the minimum of 2", count=2)
    leaving = Managed("x", Phase.RETIRING, 0.0)
    assert decide(fleet(100, 0, 0, leaving, alive("a")), keep_two, -1e9, -1e9).count == 1


@pytest.mark.parametrize("text, expected", [("0:3", (0, 3)), ("2:2", (2, 2)), ("3:1", None), ("0:0", None),
                                            ("3", None), ("a:b", None), ("-1:2", None)])
def test_parse_range(text, expected):
    if expected is None:
        with pytest.raises(ValueError, match="MIN:MAX"):
            parse_range(text)
    else:
        assert parse_range(text) == expected


# -- the real thing ---------------------------------------------------------------------------

def sample(system, token, every: float, stop: threading.Event, seen: list[dict], pids: set[int]) -> None:
    """Record /status, and the pids of the workers the server started, until ``stop``."""
    while not stop.is_set():
        try:
            seen.append(ref.get_json(system.url, token, "/status"))
            pids.update(p.pid for p in psutil.Process(system.server.pid).children()
                        if "--worker-name" in p.cmdline())
        except (OSError, psutil.Error):
            pass
        stop.wait(every)  # the sampling period


def autoscaled_alive(status: dict) -> set[str]:
    return {w["name"] for w in status["workers"] if w["autoscaled"] and w["alive"]}


def decided_after(system, token, after: float, timeout: float = 30) -> dict:
    """/status once the autoscaler has taken a decision later than ``after`` (wall clock)."""
    return wait_until(lambda: (s := ref.get_json(system.url, token, "/status"))["autoscale"]["last_decision"]["at"]
                      > after and s, timeout, "the autoscaler's next decision")


def steady(system, token, ticks: int = 3) -> dict:
    """/status after ``ticks`` more decisions of the autoscaler (it decides every 0.5 s)."""
    status = ref.get_json(system.url, token, "/status")
    for _ in range(ticks):
        status = decided_after(system, token, status["autoscale"]["last_decision"]["at"])
    return status


def test_a_burst_brings_up_three_workers_which_leave_when_idle(make_system):
    system = make_system("--autoscale", "0:3", "--idle-timeout", "2", "--hedge", "off",
                         "--autoscale-worker-args", "--slow-rate 1 --slow-ms 300 --capacity 2")
    token = system.login()
    status = steady(system, token)  # no work: several decisions, and nobody starts
    assert status["workers"] == [] and status["autoscale"]["launched"] == 0
    assert status["autoscale"]["last_decision"]["reason"] == "nothing queued"

    seen: list[dict] = []
    pids: set[int] = set()
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(system, token, 0.25, stop, seen, pids))
    sampler.start()
    try:
        wid = workload(system.url, token)
        frames = {i: frame_png(i, 64, 48) for i in range(60)}
        push(system, token, wid, frames)
        wait_completed(system.url, token, wid, timeout=120)
        check_filtered(system, token, wid, frames)
        gone = wait_until(lambda: (s := ref.get_json(system.url, token, "/status"))["autoscale"]["workers"] == {}
                          and not autoscaled_alive(s) and s, 60, "autoscaled workers to retire")
    finally:
        stop.set()
        sampler.join()
    peak = max(len(autoscaled_alive(s)) for s in seen)
    assert peak == 3, f"peak of {peak} autoscaled workers"
    assert all(len(autoscaled_alive(s)) <= 3 for s in seen)
    scale = gone["autoscale"]
    assert scale["launched"] == 3 and scale["retired"] == 3 and scale["failed"] == 0
    assert scale["last_action"]["action"] == "retire" and "idle for" in scale["last_action"]["reason"]
    assert any(s["autoscale"]["last_action"]["action"] == "launch" and "jobs queued" in s["autoscale"]["last_action"]["reason"]
               for s in seen)
    assert len(pids) == 3, f"worker processes seen: {pids}"
    for pid in pids:  # each retired worker's process has ended
        wait_until(lambda pid=pid: exited(pid), 20, f"autoscaled worker pid {pid} to exit")
    # Secondary: each stopped by itself, drained, not killed after the grace period. Only its own
    # last log line tells: its exit code goes to the server (its parent), not to us.
    for name in ("auto-1", "auto-2", "auto-3"):
        assert "stopped" in (system.data_dir / "autoscale" / f"{name}.log").read_text()


def test_hand_started_workers_are_never_retired_and_a_minimum_is_kept(make_system):
    system = make_system("--autoscale", "1:2", "--idle-timeout", "1")
    system.start_worker("by-hand")
    token = system.login()
    system.wait_workers({"by-hand", "auto-1"}, token)  # the minimum of one starts without work
    wid = workload(system.url, token)
    push(system, token, wid, {i: frame_png(i, 32, 32) for i in range(4)})
    wait_completed(system.url, token, wid)
    idle_from = time.time()
    # Idle beyond the 1 s timeout (the behaviour under test): wait for a decision taken 3 s into
    # the idle time, and for the fleet to have settled: one autoscaled worker, none leaving.
    status = wait_until(
        lambda: list((s := decided_after(system, token, idle_from + 3))["autoscale"]["workers"].values()) == ["alive"]
        and len(autoscaled_alive(s)) == 1 and s, 60, "the autoscaled fleet to settle at its minimum")
    workers = {w["name"]: w for w in status["workers"]}
    assert workers["by-hand"]["alive"] and not workers["by-hand"]["autoscaled"]
    assert len(autoscaled_alive(status)) == 1  # the minimum; a second one, if a moment's queue
    assert status["autoscale"]["retired"] == status["autoscale"]["launched"] - 1  # made one, has left


def exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_external_commands_start_and_stop_workers(make_system, tmp_path):
    """The provisioner an operator scripts (ssh, a cloud CLI): here a shell that starts a local
    worker in the background and records its pid, and one that stops it."""
    pids = tmp_path / "pids"
    pids.mkdir()
    python = sys.executable
    up = (f"cd {os.getcwd()} && nohup {python} -m worker --controller {{controller}} --worker-name {{name}}"
          f" --slow-rate 1 --slow-ms 200 >{tmp_path}/{{name}}.log 2>&1 & echo $! >{pids}/{{name}}")
    down = f"kill -TERM $(cat {pids}/{{name}})"
    system = make_system("--autoscale", "0:1", "--idle-timeout", "1", "--scale-up-cmd", up, "--scale-down-cmd", down)
    token = system.login()
    try:
        wid = workload(system.url, token)
        push(system, token, wid, {i: frame_png(i, 32, 32) for i in range(6)})
        wait_completed(system.url, token, wid, timeout=60)
        status = wait_until(lambda: (s := ref.get_json(system.url, token, "/status"))["autoscale"]["retired"] == 1
                            and s["autoscale"]["workers"] == {} and s, 30, "the worker to be retired")
        assert "external commands" in status["autoscale"]["provisioner"]
        assert status["autoscale"]["launched"] == 1
        assert sorted(p.name for p in pids.iterdir()) == ["auto-1"]  # the up command ran once
        pid = int((pids / "auto-1").read_text())
        wait_until(lambda: exited(pid), 20, "the worker process to exit")  # the down command stopped it
    finally:
        for f in pids.iterdir():  # our own processes only, by pid
            try:
                os.kill(int(f.read_text()), 9)
            except (ProcessLookupError, ValueError):
                pass


def test_failed_launches_back_off(make_system):
    """A worker flag that makes every autoscaled worker exit at once: launches slow down."""
    system = make_system("--autoscale", "1:2", "--autoscale-worker-args", "--capacity 0")
    token = system.login()
    launches: dict[str, float] = {}  # worker name -> when the autoscaler launched it (its clock)

    def three_failed() -> bool:
        scale = ref.get_json(system.url, token, "/status")["autoscale"]
        if scale["last_action"]["action"] == "launch":
            launches.setdefault(scale["last_action"]["reason"].split(":")[0], scale["last_action"]["at"])
        return scale["failed"] >= 3 and len(launches) >= 3

    wait_until(three_failed, 60, "three failed launches")
    at = sorted(launches.values())
    gaps = [b - a for a, b in zip(at, at[1:])]
    # Each launch waits out the backoff of the failure before it: 2 s, then 4 s (the cooldown
    # alone would allow one every 2 s). A launch fails after it, so a gap is at least the backoff.
    assert gaps[0] >= 2 - 0.05 and gaps[1] >= 4 - 0.05, (launches, gaps)


def test_jobs_our_workers_could_not_run_launch_nothing(make_system):
    system = make_system("--autoscale", "0:2", "--autoscale-worker-args", "--tags blue")
    token = system.login()
    wid = workload(system.url, token, tags="gpu")  # no autoscaled worker will have gpu
    push(system, token, wid, {i: frame_png(i, 32, 32) for i in range(3)})
    blue = workload(system.url, token, tags="blue")
    wait_until(lambda: ref.get_json(system.url, token, "/status")["queued_jobs"] == 3, 10, "3 queued gpu jobs")
    status = steady(system, token)  # several decisions taken with the gpu jobs queued
    assert status["autoscale"]["launched"] == 0 and status["queued_jobs"] == 3
    push(system, token, blue, {0: frame_png(0, 32, 32)})  # this one they can run
    wait_completed(system.url, token, blue, timeout=60)
    assert ref.get_json(system.url, token, "/status")["autoscale"]["launched"] == 1
