"""Start and stop a real DPIP system (``main.py`` + workers as subprocesses) on this machine.

Used by ``make run``, ``make e2e``, ``make bench`` and the end-to-end tests, so they all start
the system the same way an operator does: with the real commands, over real sockets.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent


class ServerExited(RuntimeError):
    """The server process ended while it was being waited for."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something truthy; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any DPIP_* setting of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPIP_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class LocalSystem:
    """A server and its workers as child processes, with a tiny HTTP client for readiness."""

    def __init__(
        self,
        data_dir: Path,
        log_dir: Path | None = None,
        port: int | None = None,
        controller_port: int | None = None,
        admin_password: str = "dpip-test-password",
        server_args: tuple[str, ...] = (),
        python: str = sys.executable,
        inherit_env: bool = False,
        server_env: dict[str, str] | None = None,
        tls_dir: Path | None = None,
        mutual_tls: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir)
        # TLS (admin.certs makes the CA and the server's certificate in tls_dir; each worker
        # gets its own when the plane is mutual): https:// API, tls+tcp:// worker plane.
        self.tls_dir = Path(tls_dir) if tls_dir else None
        self.mutual_tls = mutual_tls
        self._ssl: ssl.SSLContext | None = None
        if self.tls_dir is not None:
            from admin import certs
            if not (self.tls_dir / "server.pem").exists():
                certs.init(self.tls_dir, ["127.0.0.1"])
            self._ssl = ssl.create_default_context(cafile=str(self.tls_dir / "ca.pem"))
        self.log_dir = Path(log_dir) if log_dir else None
        self.port = port or free_port()
        self.controller_port = controller_port or free_port()
        # Ports picked here may be taken by another process before the server binds them (a
        # free port is only free when asked): the first start then tries new ones.
        self._may_move = port is None and controller_port is None
        self.admin_password = admin_password
        self.server_args = server_args
        self.python = python
        self.inherit_env = inherit_env
        self.server_env = server_env or {}  # e.g. the object store's AWS_* variables
        self.server: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self._logs: list[IO] = []

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_dir else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> str:
        """The CA that signed the server's certificate (TLS only)."""
        assert self.tls_dir is not None, "a LocalSystem with tls_dir"
        return str(self.tls_dir / "ca.pem")

    def tls_server_args(self) -> list[str]:
        if self.tls_dir is None:
            return []
        d = self.tls_dir
        return ["--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server.key"),
                *(["--tls-client-ca", str(d / "ca.pem")] if self.mutual_tls else [])]

    def tls_worker_args(self, name: str, args: tuple[str, ...] = ()) -> list[str]:
        """A worker's TLS flags: the CA, and (mutual TLS, unless ``args`` bring their own) a
        certificate issued for ``name``."""
        if self.tls_dir is None or "--tls-ca" in args:
            return []
        flags = ["--tls-ca", self.ca_file]
        if self.mutual_tls and "--tls-cert" not in args:
            from admin import certs
            issued = certs.worker(self.tls_dir, name, force=True)  # a restarted worker gets a new pair
            flags += ["--tls-cert", str(issued.cert), "--tls-key", str(issued.key)]
        return flags

    @property
    def controller(self) -> str:
        return f"127.0.0.1:{self.controller_port}"

    def _spawn(self, name: str, argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        out: Any = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")
            self._logs.append(out)
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)

    def start_server(self, wait: bool = True, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start ``main.py``; ``prefix`` wraps the command (e.g. ``ip netns exec NS``). On the
        first start, a server that exits at once (a port picked here taken meanwhile by another
        process, as a free port can be) is started again on new ports, twice at most."""
        env = self._env(**self.server_env)
        if self.admin_password:
            env["DPIP_ADMIN_PASSWORD"] = self.admin_password
        for attempt in range(3):
            argv = [*prefix,
                self.python, "main.py", "--host", "127.0.0.1", "--port", str(self.port),
                "--controller-port", str(self.controller_port), "--data-dir", str(self.data_dir),
                *self.tls_server_args(), *self.server_args,
            ]
            self.server = self._spawn("server", argv, ROOT, env)
            if not wait:
                break
            try:
                wait_until(self._api_up, 30, "the API to answer")
                break
            except ServerExited:
                if not self._may_move or self.workers or attempt == 2:
                    raise
                self.port, self.controller_port = free_port(), free_port()
        self._may_move = False  # (a restart keeps its ports: workers know them)
        return self.server

    def start_worker(
        self, name: str, *args: str, reference_form: bool = False,
        name_flag: str = "--worker-name", env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ) -> subprocess.Popen:
        """Start a worker; ``reference_form`` runs ``cd worker/ && python main.py`` instead of -m."""
        flags = ["--controller", self.controller, name_flag, name, *self.tls_worker_args(name, args), *args]
        if reference_form:
            argv, cwd = [*prefix, self.python, "main.py", *flags], ROOT / "worker"
        else:
            argv, cwd = [*prefix, self.python, "-m", "worker", *flags], ROOT
        proc = self._spawn(f"worker-{name}", argv, cwd, self._env(**(env or {})))
        self.workers[name] = proc
        return proc

    def start_workers(self, specs: dict[str, tuple[str, ...]], timeout: float = 30) -> str:
        """Start workers (name -> extra flags), wait until all are alive; return a user token."""
        for name, args in specs.items():
            self.start_worker(name, *args)
        token = self.login()
        self.wait_workers(set(specs), token, timeout)
        return token

    def start_many_workers(self, specs: dict[str, tuple[str, ...]], timeout: float = 30) -> str:
        """``start_workers`` for many at once (64 take a while on 2 cores): fails as soon as one
        of them exits instead of after the whole ``timeout``; returns a user token."""
        for name, args in specs.items():
            self.start_worker(name, *args)
        token = self.login()
        names = set(specs)

        def joined() -> bool:
            dead = {n: p.returncode for n, p in self.workers.items() if n in names and p.poll() is not None}
            if dead:
                raise RuntimeError(f"workers exited before joining (name: exit code): {dead}")
            return names <= self.alive_workers(token)

        wait_until(joined, timeout, f"{len(names)} workers to be alive", interval=0.2)
        return token

    def _env(self, **extra: str) -> dict[str, str]:
        if self.inherit_env:
            return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
        return clean_env(**extra)

    def _api_up(self) -> bool:
        if self.server is not None and self.server.poll() is not None:
            raise ServerExited(f"server exited with {self.server.returncode}")
        try:
            urllib.request.urlopen(self.url + "/status", timeout=1, context=self._ssl)
        except urllib.error.HTTPError:
            return True  # 401: it is up
        except (OSError, http.client.HTTPException):
            # (not an answer of ours: another process may have taken the port picked for it, and
            # this one is about to exit, which moves it to new ports)
            return False
        return True

    def login(self, user: str = "admin", password: str | None = None) -> str:
        cred = base64.b64encode(f"{user}:{password or self.admin_password}".encode()).decode()
        req = urllib.request.Request(self.url + "/login", headers={"Authorization": f"Basic {cred}"})
        with urllib.request.urlopen(req, timeout=10, context=self._ssl) as r:
            return json.load(r)["token"]

    def get(self, path: str, token: str) -> Any:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10, context=self._ssl) as r:
            return json.load(r)

    def alive_workers(self, token: str) -> set[str]:
        return {w["name"] for w in self.get("/status", token)["workers"] if w["alive"]}

    def wait_workers(self, names: set[str] | int, token: str | None = None, timeout: float = 30) -> None:
        token = token or self.login()
        if isinstance(names, int):
            n = names
            wait_until(lambda: len(self.alive_workers(token)) >= n, timeout, f"{n} live workers")
        else:
            wait_until(lambda: names <= self.alive_workers(token), timeout, f"workers {sorted(names)}")

    def stop_worker(self, name: str, timeout: float = 15) -> int:
        """SIGTERM one worker (it drains), wait for it, forget it; returns its exit code."""
        proc = self.workers.pop(name)
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop(self, timeout: float = 15, grace: float = 0.0) -> None:
        """SIGTERM everything (workers first), wait, SIGKILL what is left.

        ``grace``: seconds to let processes that were already signalled (Ctrl-C reaches the
        whole process group) finish on their own before they get a SIGTERM.
        """
        procs = [*self.workers.values(), *([self.server] if self.server else [])]
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"localsys: {' '.join(map(str, p.args))[:120]} ignored SIGTERM; killing it",
                      file=sys.stderr)
                p.kill()
                p.wait()
        for f in self._logs:
            f.close()
        self._logs.clear()

    def logs(self) -> str:
        """Every process's log, for a failing test's report."""
        if self.log_dir is None:
            return ""
        parts = []
        for f in sorted(self.log_dir.glob("*.log")):
            parts.append(f"----- {f.name} -----\n{f.read_text(errors='replace')[-20000:]}")
        return "\n".join(parts)

    def __enter__(self) -> LocalSystem:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """Stopped whatever happened; if something failed, with its processes' logs printed first
        (pytest shows them beside the failure)."""
        try:
            if exc_type is not None:
                print(self.logs())
        finally:
            self.stop()
