"""``make run``: the server and two local workers in the foreground; Ctrl-C stops all three.

Ports and data dir follow the usual flags' variables (DPIP_PORT, DPIP_CONTROLLER_PORT,
DPIP_DATA_DIR); defaults 8080, 40899 and ./data.

- A port already taken fails the start at once, naming the port (and who holds it, when this
  user may know): checked before anything starts, and again if the server exits while starting.
- "DPIP is up" is printed only once *our* server listens on both ports and answers, and both
  workers have joined it (not whatever else answers on 8080).
- The server and the workers die with this launcher, even when it is killed with -9: on Linux
  each child asks the kernel for a SIGTERM when its parent dies (PR_SET_PDEATHSIG); the workers
  also run with --exit-with-parent. No orphan is left holding the ports.
- Their output comes through this process, each line prefixed with its name, relayed by one
  loop here: no threads, so forking the children from this process is safe.
"""

from __future__ import annotations

import collections
import ctypes
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from common.config import API_PORT, CONTROLLER_PORT
from harness.localsys import ROOT, LocalSystem

HOST = "127.0.0.1"  # where LocalSystem starts the server
WORKERS = ("local-1", "local-2")
START_TIMEOUT = 60.0  # seconds for the server, then for the workers (a slow, busy machine)
TAIL_LINES = 12  # of a process's output, quoted when it exits unexpectedly
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class StartError(Exception):
    """The system cannot be brought up; the message says why."""


class Stopped(Exception):
    """A signal asked us to stop while the system was starting."""


def port_in_use(port: int, what: str) -> str | None:
    """Why ``port`` cannot be ours, or None: bound the way the server binds it (SO_REUSEADDR, so
    a connection lingering in TIME_WAIT does not count), then let go at once."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as e:
            return f"port {port} ({what}) is already in use on {HOST}{_holder(port)} ({e.strerror})"
    return None


def _holder(port: int) -> str:
    """``, by pid N (command)`` for the process listening on ``port``, when we may see it."""
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                command = " ".join(psutil.Process(c.pid).cmdline())[:100]
                return f", by pid {c.pid} ({command})"
    except (psutil.Error, OSError):
        pass
    return ""


def die_with_us() -> Callable[[], None] | None:
    """A ``preexec_fn`` after which the kernel sends the child SIGTERM when this process dies,
    however it dies (Linux; elsewhere None, and only the workers' --exit-with-parent remains)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    args = [ctypes.c_ulong(v) for v in (signal.SIGTERM, 0, 0, 0)]

    def preexec() -> None:
        prctl(ctypes.c_int(PR_SET_PDEATHSIG), *args)
        if os.getppid() != parent:  # we died between the fork and the prctl: nobody would tell
            os._exit(1)

    return preexec


class Launcher(LocalSystem):
    """The LocalSystem of ``make run``: children that die with us, output relayed and kept."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tails: dict[str, collections.deque[str]] = {}
        self.exits: dict[str, int] = {}  # reported exits, by process name
        self.stop_signal = 0
        self._selector = selectors.DefaultSelector()
        self._partial: dict[str, bytes] = {}
        self._preexec = die_with_us()
        self._token: str | None = None

    # -- processes and their output ---------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=self._preexec)
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        name = name.removeprefix("worker-")  # as in self.workers: local-1, local-2; and server
        self.tails[name] = collections.deque(maxlen=TAIL_LINES)
        self._selector.register(proc.stdout, selectors.EVENT_READ, name)
        return proc

    def pump(self, timeout: float) -> None:
        """Relay what the children wrote, waiting up to ``timeout`` for something."""
        if not self._selector.get_map():
            time.sleep(timeout)
            return
        for key, _ in self._selector.select(timeout):
            name = key.data
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:  # the process closed its output: it is exiting
                self._selector.unregister(key.fileobj)
                key.fileobj.close()
                if rest := self._partial.pop(name, b""):
                    self._show(name, rest)
                continue
            *lines, self._partial[name] = (self._partial.get(name, b"") + chunk).split(b"\n")
            for line in lines:
                self._show(name, line)

    def _show(self, name: str, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self.tails[name].append(text)
        print(f"{name:<7} | {text}", flush=True)

    def tail(self, name: str) -> str:
        self.pump(0)
        return "\n".join(f"    {line}" for line in self.tails.get(name, ())) or "    (no output)"

    def processes(self) -> dict[str, subprocess.Popen]:
        return {**({"server": self.server} if self.server else {}), **self.workers}

    def wait_for(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        """Relay output until ``cond()``; StartError after ``timeout``, Stopped on a signal."""
        deadline = time.monotonic() + timeout
        while not cond():
            if self.stop_signal:
                raise Stopped()
            if time.monotonic() > deadline:
                raise StartError(f"timed out after {timeout:.0f} s waiting for {what}")
            self.pump(0.1)

    def shutdown(self, grace: float) -> None:
        """Let processes that got the signal already finish (Ctrl-C reaches the whole process
        group), relaying their last words; then SIGTERM, and SIGKILL, what is left."""
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in self.processes().values()) and time.monotonic() < deadline:
            self.pump(0.1)
        self.stop(grace=0.0)
        deadline = time.monotonic() + 2
        while self._selector.get_map() and time.monotonic() < deadline:
            self.pump(0.1)

    # -- readiness ----------------------------------------------------------------------------

    def exited(self, name: str, when: str = "") -> str:
        """``name`` (``server`` or a worker's) has exited: with what, and its last lines."""
        proc = self.processes()[name]
        label = "the server" if name == "server" else f"worker {name}"
        return (f"{label} exited with code {proc.returncode}{' ' + when if when else ''}; its last lines:\n"
                f"{self.tail(name)}")

    def _listening_ports(self, pid: int) -> set[int]:
        try:
            proc = psutil.Process(pid)
            conns = proc.net_connections(kind="tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
        except psutil.Error:
            return set()
        return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN and c.laddr}

    def server_ready(self) -> bool:
        """Our server process listens on both ports and its API answers."""
        assert self.server is not None
        if self.server.poll() is not None:
            taken = [p for p in (port_in_use(self.port, "the API"), port_in_use(self.controller_port, "the controller"))
                     if p]
            why = f" ({'; '.join(taken)})" if taken else ""
            raise StartError(self.exited("server", f"while starting{why}"))
        if not {self.port, self.controller_port} <= self._listening_ports(self.server.pid):
            return False
        return self._api_up()

    def workers_joined(self) -> bool:
        """Every worker is alive in /status (or, with no admin password at hand to ask, connected)."""
        for name, proc in self.workers.items():
            if proc.poll() is not None:
                raise StartError(self.exited(name, "while joining"))
        if self._token is None:
            self._token = self._admin_token()
        if self._token:
            return set(self.workers) <= self.alive_workers(self._token)
        return all(self._connected(p.pid) for p in self.workers.values())

    def _admin_token(self) -> str:
        password = self.admin_password
        path = self.data_dir / "admin-password"
        if not password and path.exists():
            password = path.read_text().strip()
        try:
            return self.login(os.environ.get("DPIP_ADMIN_USER", "admin"), password) if password else ""
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            return ""

    def _connected(self, pid: int) -> bool:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        return any(c.raddr and c.raddr.port == self.controller_port and c.status == psutil.CONN_ESTABLISHED
                   for c in conns)


def banner(system: Launcher) -> str:
    data = system.data_dir
    try:
        data = data.relative_to(Path.cwd())
    except ValueError:
        pass
    user = os.environ.get("DPIP_ADMIN_USER", "admin")
    url = f"http://localhost:{system.port}"
    if os.environ.get("DPIP_ADMIN_PASSWORD"):
        password, curl = "the one in $DPIP_ADMIN_PASSWORD", "$DPIP_ADMIN_PASSWORD"
    elif (system.data_dir / "admin-password").exists():
        password = f"printed on the first start, and kept in {data / 'admin-password'}"
        curl = f"$(cat {data / 'admin-password'})"
    else:
        password, curl = "the one DPIP_ADMIN_PASSWORD had on the first start", "PASSWORD"
    login = ".venv/bin/dpip login" + ("" if system.port == API_PORT else f" --url {url}")
    return (f"\nDPIP is up: API {url} (dashboard at /), controller {system.controller}, data in {data}\n"
            f"  admin password ({user}): {password}\n"
            f"  log in:  {login}    or:  curl -u {user}:{curl} {url}/login\n"
            f"  Ctrl-C stops the server and both workers.\n")


def main() -> int:
    port = int(os.environ.get("DPIP_PORT", API_PORT))
    controller_port = int(os.environ.get("DPIP_CONTROLLER_PORT", CONTROLLER_PORT))
    if port == controller_port:
        print(f"make run: DPIP_PORT and DPIP_CONTROLLER_PORT are both {port}: they must differ", file=sys.stderr)
        return 1
    taken = [p for p in (port_in_use(port, "the API"), port_in_use(controller_port, "the controller")) if p]
    if taken:
        for problem in taken:
            print(f"make run: {problem}", file=sys.stderr)
        print("make run: is another DPIP still running? Stop it, or choose other ports, e.g. "
              f"DPIP_PORT={port + 1} DPIP_CONTROLLER_PORT={controller_port + 1} make run", file=sys.stderr)
        return 1

    system = Launcher(
        data_dir=Path(os.environ.get("DPIP_DATA_DIR", ROOT / "data")),
        port=port,
        controller_port=controller_port,
        admin_password=os.environ.get("DPIP_ADMIN_PASSWORD", ""),
        inherit_env=True,
    )

    def on_signal(signum: int, frame: object) -> None:
        system.stop_signal = signum

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        system.start_server(wait=False)
        system.wait_for(system.server_ready, START_TIMEOUT, "the server to listen and answer")
        for name in WORKERS:
            system.start_worker(name, "--exit-with-parent")
        system.wait_for(system.workers_joined, START_TIMEOUT, f"workers {', '.join(WORKERS)} to join")
        print(banner(system), flush=True)
        assert system.server is not None
        while system.server.poll() is None and not system.stop_signal:
            system.pump(0.2)
            for name, proc in system.workers.items():
                if proc.poll() is not None and name not in system.exits:
                    system.exits[name] = proc.returncode
                    print(f"make run: {system.exited(name)}", file=sys.stderr, flush=True)
        if not system.stop_signal:
            print(f"make run: {system.exited('server')}\nmake run: stopping the workers",
                  file=sys.stderr, flush=True)
            return 1
        print("\nstopping DPIP ...", flush=True)
        return 0
    except StartError as e:
        print(f"make run: {e}\nmake run: DPIP did not start", file=sys.stderr, flush=True)
        return 1
    except Stopped:
        print("\nstopping DPIP ...", flush=True)
        return 0
    finally:
        system.shutdown(grace=10.0 if system.stop_signal == signal.SIGINT else 0.0)
        print("DPIP stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
