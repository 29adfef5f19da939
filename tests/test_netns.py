"""Across hosts: the server and two workers on three test hosts (network namespaces joined by
veth pairs and a bridge), the server on --host 0.0.0.0. One worker's link is cut mid-workload:
the workload completes on the other; when the link heals, the cut-off worker rejoins by itself.

Needs root and `ip netns` (CI runs as root on this kind of machine).
"""

from __future__ import annotations

import ctypes
import contextlib
import io
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from PIL import Image

from admin import certs
from tests.helpers import ADMIN_PASSWORD, LocalSystem, frame_png, ref, unavailable, wait_until

SUBNET = "10.231.77"
SERVER_IP = f"{SUBNET}.1"
CLONE_NEWNET = 0x40000000
JOIN_TOKEN = "netns-test-join-token"  # off loopback the controller requires one


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


class Net:
    """Three hosts and a switch, each a network namespace of its own."""

    def __init__(self, tag: str) -> None:
        self.switch = f"dpip-sw-{tag}"
        self.hosts = {"srv": f"dpip-srv-{tag}", "w1": f"dpip-w1-{tag}", "w2": f"dpip-w2-{tag}"}
        self.ips = {"srv": SERVER_IP, "w1": f"{SUBNET}.2", "w2": f"{SUBNET}.3"}
        self.tag = tag

    def up(self) -> None:
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for key, ns in self.hosts.items():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            host_end, switch_end = f"v{key}{self.tag}"[:15], f"b{key}{self.tag}"[:15]
            sh("ip", "link", "add", host_end, "netns", ns, "type", "veth", "peer", "name", switch_end,
               "netns", self.switch)
            sh("ip", "-n", ns, "addr", "add", f"{self.ips[key]}/24", "dev", host_end)
            sh("ip", "-n", ns, "link", "set", host_end, "up")
            sh("ip", "-n", self.switch, "link", "set", switch_end, "master", "br0")
            sh("ip", "-n", self.switch, "link", "set", switch_end, "up")

    def link(self, key: str, up: bool) -> None:
        """Cut or heal a host's cable, at the switch."""
        sh("ip", "-n", self.switch, "link", "set", f"b{key}{self.tag}"[:15], "up" if up else "down")

    def down(self) -> None:
        for ns in [*self.hosts.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)

    def prefix(self, key: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.hosts[key])


class InNamespace:
    """Runs calls on a thread that has entered a network namespace (setns is per thread)."""

    def __init__(self, ns: str) -> None:
        self._pool = ThreadPoolExecutor(1, initializer=self._enter, initargs=(ns,))

    @staticmethod
    def _enter(ns: str) -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
        finally:
            os.close(fd)

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._pool.submit(fn, *args).result(timeout=60)

    def close(self) -> None:
        self._pool.shutdown()


def netns_unavailable() -> str:
    """Why this machine cannot build the test's namespaces ("" if it can)."""
    if os.geteuid() != 0:
        return "builds network namespaces: needs root (CI runs it as root)"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        return f"`ip netns` is unavailable here: {r.stderr.strip() or r.returncode}"
    return ""


@pytest.fixture
def net() -> Iterator[Net]:
    if why := netns_unavailable():
        unavailable(why)
    n = Net(str(os.getpid() % 100000))
    n.down()
    try:
        n.up()
    except subprocess.CalledProcessError as e:  # root, but not allowed to (a container without CAP_NET_ADMIN)
        n.down()
        unavailable(f"cannot build network namespaces here: {' '.join(e.cmd)}: {e.stderr.decode().strip()}")
    try:
        yield n
    finally:
        n.down()


@pytest.mark.parametrize("tls", [False, True], ids=["clear", "tls"])
def test_partitioned_worker_loses_nothing_and_rejoins(net, tmp_path, monkeypatch, tls):
    tls_dir = None
    if tls:  # mutual TLS: the server's certificate names its bridge address; each worker gets its own
        tls_dir = tmp_path / "tls"
        certs.init(tls_dir, [SERVER_IP])
        monkeypatch.setenv("DPIP_CA_FILE", str(tls_dir / "ca.pem"))  # for the reference client (refclient)
    system = LocalSystem(tmp_path / "data", log_dir=tmp_path / "logs", admin_password=ADMIN_PASSWORD,
                         port=8080, controller_port=40899, tls_dir=tls_dir,
                         server_args=("--host", "0.0.0.0", "--join-token", JOIN_TOKEN))
    system.start_server(wait=False, prefix=net.prefix("srv"))
    controller = f"{SERVER_IP}:40899"
    for key in ("w1", "w2"):
        system.start_worker(key, "--controller", controller, "--slow-rate", "1", "--slow-ms", "300",
                            prefix=net.prefix(key), env={"DPIP_JOIN_TOKEN": JOIN_TOKEN})
    url = f"{'https' if tls else 'http'}://{SERVER_IP}:8080"
    on_server = InNamespace(net.hosts["srv"])
    with system, contextlib.closing(on_server):  # stopped whatever happens; logs printed if this fails
        def api_up() -> bool:
            try:
                return on_server(ref.request, url, "GET", "/status").status == 401
            except OSError:
                return False

        wait_until(api_up, 30, "the API on the server host")
        token = on_server(ref.login, url, "admin", ADMIN_PASSWORD)
        # /metrics is open on loopback only: this client is on the bridge, so it needs the token.
        assert on_server(ref.request, url, "GET", "/metrics").status == 401
        metrics = on_server(ref.request, url, "GET", "/metrics", None, ref.bearer(token))
        assert metrics.status == 200 and b"dpip_workers_alive" in metrics.body

        def workers() -> dict[str, dict]:
            return {w["name"]: w for w in on_server(ref.get_json, url, token, "/status")["workers"]}

        wait_until(lambda: all(w["alive"] for w in workers().values()) and len(workers()) == 2,
                   30, "both workers to join from their hosts")
        # Each advertises the address of its own host, never 127.0.0.1.
        scheme = "tls+tcp" if tls else "tcp"
        assert workers()["w1"]["rpc_address"].startswith(f"{scheme}://{net.ips['w1']}:")
        assert workers()["w2"]["rpc_address"].startswith(f"{scheme}://{net.ips['w2']}:")

        wid = on_server(ref.create_workload, url, token)["workload_id"]
        frames = {i: frame_png(i, 64, 48) for i in range(30)}
        for i, data in frames.items():
            assert on_server(ref.upload, url, token, wid, f"{i}.png", data).status == 200

        def progress() -> dict:
            return on_server(ref.get_json, url, token, f"/workloads/{wid}")

        wait_until(lambda: len(progress()["filtered_images"]) >= 4, 60, "some results")
        net.link("w1", up=False)  # pull w1's cable mid-workload
        wait_until(lambda: not workers()["w1"]["alive"], 30, "w1 to be declared dead")
        final = wait_until(lambda: (v := progress())["status"] == "completed" and v, 120,
                           "the workload to complete on w2")
        assert final["filtered_images"] == list(range(30)) and final["failed_images"] == []
        for i, data in frames.items():
            got = on_server(ref.pull, url, token, wid, i)
            with Image.open(io.BytesIO(got.body)) as im, Image.open(io.BytesIO(data)) as src:
                assert im.tobytes() == src.convert("L").tobytes()

        net.link("w1", up=True)  # heal: w1 rejoins by itself, no restart
        wait_until(lambda: workers()["w1"]["alive"], 60, "w1 to rejoin after the link heals")
        before = workers()["w1"]["jobs_done"]
        second = on_server(ref.create_workload, url, token)["workload_id"]
        for i in range(8):
            assert on_server(ref.upload, url, token, second, f"{i}.png", frames[i]).status == 200
        wait_until(lambda: on_server(ref.get_json, url, token, f"/workloads/{second}")["status"]
                   == "completed", 60, "the second workload")
        wait_until(lambda: workers()["w1"]["jobs_done"] > before, 10, "w1 to take work again")
