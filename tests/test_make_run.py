"""`make run` (scripts/run_local.py) as a user meets it: a port already taken, a server that
cannot start, a launcher killed with -9 and started again, Ctrl-C.

Each test runs the real launcher on free ports and a data dir of its own, in a process group of
its own (so that a Ctrl-C can reach it and its children, as from a terminal, and so that a test
that fails cannot leave processes behind: the teardown kills that group).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import (
    ADMIN_PASSWORD,
    ROOT,
    LocalSystem,
    clean_env,
    free_port,
    port_free,
    wait_until,
)


class Launch:
    """One `make run`: its output in files, its children remembered by pid."""

    def __init__(self, tmp: Path, port: int, controller_port: int, data_dir: Path, n: int = 0) -> None:
        self.stdout, self.stderr = tmp / f"run{n}.out", tmp / f"run{n}.err"
        self.port, self.controller_port = port, controller_port
        env = clean_env(DPIP_PORT=str(port), DPIP_CONTROLLER_PORT=str(controller_port),
                        DPIP_DATA_DIR=str(data_dir), DPIP_ADMIN_PASSWORD=ADMIN_PASSWORD)
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "scripts.run_local"], cwd=ROOT, env=env, stdout=out,
                                         stderr=err, start_new_session=True)
        self.client = LocalSystem(data_dir, port=port, controller_port=controller_port,
                                  admin_password=ADMIN_PASSWORD)
        self.children: list[int] = []

    def out(self) -> str:
        return self.stdout.read_text(errors="replace")

    def err(self) -> str:
        return self.stderr.read_text(errors="replace")

    def report(self) -> str:
        return f"--- stdout ---\n{self.out()[-6000:]}\n--- stderr ---\n{self.err()[-6000:]}"

    def wait_up(self, timeout: float = 90) -> None:
        wait_until(lambda: "DPIP is up" in self.out() or self.proc.poll() is not None, timeout, "make run to be up")
        assert self.proc.poll() is None, f"make run exited with {self.proc.returncode}\n{self.report()}"
        self.children = [c.pid for c in psutil.Process(self.proc.pid).children()]

    def wait_exit(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"make run still running after {timeout} s\n{self.report()}") from None

    def kill_group(self) -> None:
        """Teardown: whatever is left of this launch (it and its children share its group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited, not yet reaped by init
    except psutil.NoSuchProcess:
        return True


def running_with(text: str) -> list[int]:
    """Pids of live processes whose command line mentions ``text`` (our unique data dir)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in part for part in p.info["cmdline"] or []) and not gone(p.pid):
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


@pytest.fixture
def launches(tmp_path) -> Iterator[list[Launch]]:
    made: list[Launch] = []
    yield made
    for launch in made:
        launch.kill_group()


@pytest.fixture
def ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.mark.parametrize("taken", ["api", "controller"])
def test_a_taken_port_fails_fast_and_names_it(tmp_path, launches, ports, taken):
    port, controller_port = ports
    busy = port if taken == "api" else controller_port
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", busy))
        squatter.listen()
        launch = Launch(tmp_path, port, controller_port, tmp_path / "data")
        launches.append(launch)
        rc = launch.wait_exit(20)
    assert rc == 1, launch.report()
    assert f"port {busy} ({'the API' if taken == 'api' else 'the controller'}) is already in use" in launch.err()
    assert "DPIP is up" not in launch.out()
    assert not (tmp_path / "data").exists(), "something was started before the check"
    assert running_with(str(tmp_path / "data")) == []


def test_a_server_that_dies_while_starting_is_reported(tmp_path, launches, ports):
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("a file where the data dir should be")
    launch = Launch(tmp_path, *ports, not_a_dir)
    launches.append(launch)
    rc = launch.wait_exit(60)
    assert rc == 1, launch.report()
    err = launch.err()
    assert "the server exited with code 1 while starting; its last lines:" in err, launch.report()
    assert str(not_a_dir) in err.split("its last lines:")[1]  # the server's own last words, quoted
    assert "DPIP is up" not in launch.out()
    assert running_with(str(not_a_dir)) == []


def test_kill_9_takes_server_and_workers_along_and_the_next_run_starts(tmp_path, launches, ports):
    first = Launch(tmp_path, *ports, tmp_path / "data")
    launches.append(first)
    first.wait_up()
    assert len(first.children) == 3, first.children  # the server and two workers
    assert first.client.alive_workers(first.client.login()) == {"local-1", "local-2"}

    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    wait_until(lambda: all(gone(pid) for pid in first.children), 30, "the orphans to exit")
    wait_until(lambda: port_free(ports[0]) and port_free(ports[1]), 30, "the ports to be free")

    second = Launch(tmp_path, *ports, tmp_path / "data", n=1)  # the same ports and data dir
    launches.append(second)
    second.wait_up()
    server = next(p for p in second.children if "main.py" in psutil.Process(p).cmdline())
    assert {c.laddr.port for c in psutil.Process(server).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN} >= set(ports)  # its own server holds them
    assert second.client.alive_workers(second.client.login()) == {"local-1", "local-2"}

    os.killpg(second.proc.pid, signal.SIGINT)  # Ctrl-C in its terminal
    assert second.wait_exit(40) == 0, second.report()
    assert "DPIP stopped." in second.out()
    assert all(gone(pid) for pid in second.children)


def test_the_workers_stop_when_the_server_dies(tmp_path, launches, ports):
    launch = Launch(tmp_path, *ports, tmp_path / "data")
    launches.append(launch)
    launch.wait_up()
    server = next(p for p in launch.children if "main.py" in psutil.Process(p).cmdline())
    os.kill(server, signal.SIGKILL)
    assert launch.wait_exit(40) == 1, launch.report()
    assert "the server exited with code -9" in launch.err()
    wait_until(lambda: all(gone(pid) for pid in launch.children), 10, "the workers to be stopped")
