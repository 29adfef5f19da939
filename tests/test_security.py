"""Security: join tokens for workers, login throttling, users management, hostile input."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

from tests.helpers import (
    ROOT,
    check_filtered,
    frame_png,
    metric,
    push,
    ref,
    wait_completed,
    wait_until,
    workload,
)

JOIN = "s3cret-join-token"


def test_workers_need_the_join_token_when_one_is_set(make_system, tmp_path):
    system = make_system("--join-token", JOIN)
    elsewhere = tmp_path / "other-runtime"  # a process that cannot read the server user's token file
    elsewhere.mkdir(mode=0o700)
    system.start_worker("none", env={"XDG_RUNTIME_DIR": str(elsewhere)})
    system.start_worker("wrong", env={"DPIP_JOIN_TOKEN": "not-it"})
    system.start_worker("right", env={"DPIP_JOIN_TOKEN": JOIN})
    token = system.login()
    system.wait_workers({"right"}, token)
    wait_until(lambda: metric(system.url, "dpip_worker_plane_refused") >= 2, 10,
               "the controller to refuse the other two")
    assert {w["name"] for w in ref.get_json(system.url, token, "/status")["workers"]} == {"right"}
    wid = workload(system.url, token)
    frames = {i: frame_png(i, 40, 30) for i in range(4)}
    push(system, token, wid, frames)
    wait_completed(system.url, token, wid)
    check_filtered(system, token, wid, frames)
    jobs = ref.get_json(system.url, token, f"/workloads/{wid}/jobs")
    assert {j["worker"] for j in jobs} == {"right"}
    assert {w["name"] for w in ref.get_json(system.url, token, "/status")["workers"]} == {"right"}


def test_failed_logins_are_throttled_per_user_and_address(make_system):
    system = make_system("--login-failures", "3")
    bad = {"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()}
    statuses = [ref.request(system.url, "GET", "/login", headers=bad).status for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    r = ref.request(system.url, "GET", "/login", headers=bad)
    assert r.status == 429 and int(r.headers["retry-after"]) >= 1 and "try again" in r.json()["error"]
    # The right password is throttled too for that user and address (no oracle while blocked)...
    ok = {"Authorization": "Basic " + base64.b64encode(f"admin:{system.admin_password}".encode()).decode()}
    assert ref.request(system.url, "GET", "/login", headers=ok).status == 429


def test_users_command_adds_lists_and_removes(make_system, tmp_path):
    system = make_system()
    env = {**os.environ, "DPIP_PASSWORD": "bob-password-1"}

    def users(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "main.py", "users", "--data-dir", str(system.data_dir), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    assert users("add", "bob").returncode == 0
    listed = users("list").stdout
    assert "admin" in listed and "bob" in listed
    again = users("add", "bob")
    assert again.returncode == 1 and "exists" in again.stderr
    token = ref.login(system.url, "bob", "bob-password-1")  # the running server sees bob
    assert ref.request(system.url, "GET", "/status", headers=ref.bearer(token)).status == 200
    assert users("remove", "bob").returncode == 0
    bad = {"Authorization": "Basic " + base64.b64encode(b"bob:bob-password-1").decode()}
    assert ref.request(system.url, "GET", "/login", headers=bad).status == 401
    assert users("remove", "bob").returncode == 1


def test_a_worker_with_a_join_token_refuses_a_forged_welcome(make_system):
    """Someone who can reach a worker's RPC port cannot redirect it to their own 'API'."""
    import pynng

    from plane import wire

    system = make_system("--join-token", JOIN)
    system.start_worker("w", env={"DPIP_JOIN_TOKEN": JOIN})
    token = system.login()
    system.wait_workers({"w"}, token)
    rpc = next(w["rpc_address"] for w in ref.get_json(system.url, token, "/status")["workers"])
    # Without the worker's session (never shown to anyone), and then even with it (as if
    # sniffed) but without the join token's proof.
    session = "ab" * 16
    for forged in (wire.Welcome("eeee", session, "0f0f", "11" * 32, 6666, "http://attacker.invalid", 1.0),
                   wire.Welcome("eeee", session, "0f0f", "", 6666, "http://attacker.invalid", 1.0, proof="0" * 64)):
        with pynng.Req0(dial=rpc, send_timeout=3000, recv_timeout=3000) as req:
            req.send(wire.encode(forged))
            reply = wire.decode(req.recv())
        assert isinstance(reply, wire.Ack) and not reply.ok and "welcome refused" in reply.error
    wid = workload(system.url, token)  # still working for the real controller
    frames = {0: frame_png(0, 40, 30)}
    push(system, token, wid, frames)
    wait_completed(system.url, token, wid)
    check_filtered(system, token, wid, frames)
