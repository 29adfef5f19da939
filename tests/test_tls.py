"""TLS between machines: the API over HTTPS, the worker plane over tls+tcp:// with client
certificates (mutual TLS), against the real server and real workers, with certificates made by
``main.py certs`` (admin.certs)."""

from __future__ import annotations

import datetime as dt
import http.client
import io
import json
import random
import secrets
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pynng
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from PIL import Image

from admin import certs
from cli.session import EXIT_UNREACHABLE
from plane import tls
from tests.dpip_cli import Cli, frames_dir, one_line_error
from tests.helpers import (
    ADMIN_PASSWORD,
    LocalSystem,
    frame_png,
    free_port,
    metric,
    ref,
    view,
    wait_completed,
    wait_until,
    workload,
)

ROOT = Path(__file__).resolve().parent.parent


#: The servers here send images above this size over HTTP(S) (--inline-max-bytes): both paths
#: of a job's bytes are exercised under TLS.
HTTP_FROM = 256 * 1024
SPLIT = ("--inline-max-bytes", str(HTTP_FROM))


def noise_png(seed: int, size=(600, 400)) -> bytes:
    """An original too big to travel with its job (> HTTP_FROM, with SPLIT): the worker
    downloads it from the API with the job's capability."""
    rnd = random.Random(seed)
    im = Image.frombytes("RGB", size, bytes(rnd.getrandbits(8) for _ in range(size[0] * size[1] * 3)))
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)
    assert len(buf.getvalue()) > HTTP_FROM
    return buf.getvalue()


@pytest.fixture
def ca_env(monkeypatch):
    """The reference clients (refclient) and dpip trust the test CA through DPIP_CA_FILE."""
    def use(system: LocalSystem) -> None:
        monkeypatch.setenv("DPIP_CA_FILE", system.ca_file)
    return use


@pytest.fixture(scope="module")
def mtls(tmp_path_factory) -> Iterator[LocalSystem]:
    """A server with --tls-cert, --tls-key and --tls-client-ca, and two workers with their own
    certificates."""
    base = tmp_path_factory.mktemp("mtls")
    system = LocalSystem(base / "data", log_dir=base / "logs", admin_password=ADMIN_PASSWORD, tls_dir=base / "tls",
                         server_args=SPLIT)
    with system:
        system.start_server()
        system.start_workers({"w1": (), "w2": ()})
        yield system


def check_grayscale(system: LocalSystem, token: str, wid: str, frames: dict[int, bytes]) -> None:
    for i, data in frames.items():
        got = ref.pull(system.url, token, wid, i)
        assert got.status == 200
        with Image.open(io.BytesIO(got.body)) as im, Image.open(io.BytesIO(data)) as src:
            assert im.tobytes() == src.convert("L").tobytes(), f"image {i}"


def test_the_whole_flow_over_tls_gives_exact_pixels(mtls, ca_env, tmp_path):
    ca_env(mtls)
    assert mtls.url.startswith("https://")
    token = ref.login(mtls.url, "admin", ADMIN_PASSWORD)
    status = ref.get_json(mtls.url, token, "/status")
    assert {w["name"] for w in status["workers"] if w["alive"]} == {"w1", "w2"}
    assert all(w["rpc_address"].startswith("tls+tcp://127.0.0.1:") for w in status["workers"])
    wid = workload(mtls.url, token, filter="grayscale")
    # Small ones travel inside the job (over the TLS RPC), big ones by the API (HTTPS).
    frames = {i: frame_png(i, 64, 48) for i in range(6)} | {6: noise_png(6), 7: noise_png(7)}
    for i, data in frames.items():
        assert ref.upload(mtls.url, token, wid, f"{i}.png", data).status == 200
    done = wait_completed(mtls.url, token, wid)
    assert done["filtered_images"] == sorted(frames) and done["failed_images"] == []
    check_grayscale(mtls, token, wid, frames)
    # What else is served over HTTPS: metrics, the API's description, the dashboard.
    assert b"dpip_workers_alive" in ref.request(mtls.url, "GET", "/metrics").body
    assert json.loads(ref.request(mtls.url, "GET", "/openapi.json").body)["openapi"].startswith("3.")
    page = ref.request(mtls.url, "GET", "/")
    assert page.status == 200 and b"<html" in page.body.lower()
    assert ref.request(mtls.url, "GET", "/static/app.js").status == 200


def test_dpip_over_https_with_its_ca_file(mtls, tmp_path):
    cli = Cli(tmp_path / "config", mtls.url)
    # Without the CA: a one-line refusal that says what to do; never an unchecked connection.
    one_line_error(cli("login", "--url", mtls.url, "--user", "admin"), EXIT_UNREACHABLE, "certificate", "--ca-file")
    cli.ok("login", "--url", mtls.url, "--user", "admin", "--ca-file", mtls.ca_file)
    paths = frames_dir(tmp_path / "frames", 4)
    wid = cli.ok("push", tmp_path / "frames", DPIP_CA_FILE=mtls.ca_file).stdout.strip()
    out = tmp_path / "out"
    cli.ok("pull", wid, out, "--wait", "--ca-file", mtls.ca_file)
    for src in paths:
        with Image.open(src) as a, Image.open(out / src.name) as b:
            assert b.tobytes() == a.convert("L").tobytes()


class Relay:
    """A TCP relay that records every byte both ways: what anyone on the network between a
    worker and the server would see."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.seen = bytearray()
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._sock.close()
        for c in self._conns:
            c.close()


def _relayed_run(tmp_path: Path, use_tls: bool, monkeypatch) -> tuple[bytes, str, str]:
    """A system whose one worker reaches the API and the controller only through relays; a
    workload with a big original (so its bytes cross by HTTP) run through it. Returns what the
    relays saw, the user's token and the join token."""
    port, controller_port = free_port(), free_port()
    join = secrets.token_urlsafe(24)  # the worker finds no local one: it dials the relay's port
    api_relay, controller_relay = Relay(port), Relay(controller_port)
    scheme = "https" if use_tls else "http"
    system = LocalSystem(tmp_path / "data", log_dir=tmp_path / "logs", admin_password=ADMIN_PASSWORD,
                         port=port, controller_port=controller_port,
                         tls_dir=tmp_path / "tls" if use_tls else None, server_env={"DPIP_JOIN_TOKEN": join},
                         server_args=("--public-url", f"{scheme}://127.0.0.1:{api_relay.port}", *SPLIT))
    if use_tls:
        monkeypatch.setenv("DPIP_CA_FILE", system.ca_file)
    try:
        with system:
            system.start_server()
            system.start_worker("wr", "--controller", f"127.0.0.1:{controller_relay.port}",
                                env={"DPIP_JOIN_TOKEN": join})
            token = system.login()
            system.wait_workers({"wr"}, token)
            wid = workload(system.url, token, filter="grayscale")
            frames = {0: noise_png(10), 1: noise_png(11)}
            for i, data in frames.items():
                assert ref.upload(system.url, token, wid, f"{i}.png", data).status == 200
            wait_completed(system.url, token, wid)
            check_grayscale(system, token, wid, frames)
        return bytes(api_relay.seen + controller_relay.seen), token, join
    finally:
        api_relay.close()
        controller_relay.close()


#: What must never cross the network in clear: HTTP itself, bearer credentials, PNG bytes, and
#: the worker plane's field names (hello, heartbeat).
IN_CLEAR = (b"HTTP/1.1", b"Bearer ", b"\x89PNG", b"rpc_address", b"session", b"capacity", b"hello")


def test_a_relay_between_worker_and_server_sees_nothing_in_clear(tmp_path, monkeypatch):
    seen, token, join = _relayed_run(tmp_path / "tls", True, monkeypatch)
    assert len(seen) > 2 * HTTP_FROM  # both originals went through it
    for marker in (*IN_CLEAR, token.encode(), join.encode()):
        assert marker not in seen, f"{marker[:20]!r} crossed the network in clear"


def test_the_relay_does_see_everything_without_tls(tmp_path, monkeypatch):
    """The control: the same run in clear shows the relay would have caught it."""
    seen, _, _ = _relayed_run(tmp_path / "clear", False, monkeypatch)
    for marker in IN_CLEAR:
        assert marker in seen, marker


def _dial(address: str, identity: tls.Identity | None, ca: str, block: bool = True) -> pynng.Pub0:
    pub = pynng.Pub0()
    pub.tls_config = tls._nng(pynng.TLSConfig.MODE_CLIENT, identity, ca, "127.0.0.1")
    pub.dial(address, block=block)
    return pub


def _identity(issued: certs.Issued) -> tls.Identity:
    return tls.Identity(issued.cert.read_text(), issued.key.read_text())


def test_workers_without_a_right_certificate_are_never_members(mtls, tmp_path, ca_env):
    ca_env(mtls)
    token = mtls.login()
    tls_dir = mtls.tls_dir
    assert tls_dir is not None
    controller = f"tls+tcp://{mtls.controller}"
    ca = (tls_dir / "ca.pem").read_text()
    other = tmp_path / "other-ca"
    certs.init(other, ["127.0.0.1"])
    alien = certs.worker(other, "alien")
    expired = certs.worker(tls_dir, "expired", days=1,
                           not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10))
    future = certs.worker(tls_dir, "future", days=30,
                          not_before=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
    # The handshake itself refuses them: no connection, so not one message reaches the controller.
    for what, identity in (("no certificate", None), ("another CA's", _identity(alien)),
                           ("an expired one", _identity(expired)), ("one not valid yet", _identity(future))):
        with pytest.raises(pynng.NNGException):
            _dial(controller, identity, ca).close()
            pytest.fail(f"the controller took a connection with {what}")
    _dial(controller, _identity(certs.worker(tls_dir, "probe")), ca).close()  # and a right one gets in

    # Real workers: one with no certificate, one of another CA, one with w1's certificate
    # joining as another name; those whose handshake passes are refused at the welcome.
    ca_file = mtls.ca_file
    w1 = (str(tls_dir / "worker-w1.pem"), str(tls_dir / "worker-w1.key"))
    before = metric(mtls.url, "dpip_worker_welcomes_failed")
    mtls.start_worker("nocert", "--tls-ca", ca_file)
    mtls.start_worker("alien", "--tls-ca", ca_file, "--tls-cert", str(alien.cert), "--tls-key", str(alien.key))
    mtls.start_worker("imposter", "--tls-ca", ca_file, "--tls-cert", w1[0], "--tls-key", w1[1])
    # Its own expired certificate: the worker says so in one line naming it, and exits 2.
    old = mtls.start_worker("old", "--tls-ca", ca_file, "--tls-cert", str(expired.cert),
                            "--tls-key", str(expired.key))
    assert old.wait(30) == 2
    log = (mtls.log_dir / "worker-old.log").read_text()
    assert str(expired.cert) in log and "expired" in log and "Traceback" not in log
    # The imposter's hello got through (w1's certificate is of the CA); its welcome did not.
    wait_until(lambda: metric(mtls.url, "dpip_worker_welcomes_failed") > before, 30,
               "the imposter's welcome to fail")
    names = {w["name"] for w in mtls.get("/status", token)["workers"]}
    assert not names & {"nocert", "alien", "imposter", "old"}, names
    for name in ("nocert", "alien", "imposter"):
        assert mtls.workers[name].poll() is None  # still trying, harmlessly
        mtls.stop_worker(name)
    # Nobody else was disturbed.
    assert mtls.alive_workers(token) == {"w1", "w2"}
    wid = workload(mtls.url, token)
    frames = {i: frame_png(i + 50, 64, 48) for i in range(4)}
    for i, data in frames.items():
        assert ref.upload(mtls.url, token, wid, f"{i}.png", data).status == 200
    assert wait_completed(mtls.url, token, wid)["failed_images"] == []


def test_clear_text_to_the_tls_ports_gets_nothing_and_breaks_nothing(mtls, ca_env):
    host, port = "127.0.0.1", mtls.port
    conn = http.client.HTTPConnection(host, port, timeout=10)
    with pytest.raises((OSError, http.client.HTTPException)):
        conn.request("GET", "/status")
        r = conn.getresponse()
        pytest.fail(f"plain HTTP got an answer: {r.status}")
    conn.close()
    with pytest.raises(pynng.NNGException):
        with pynng.Pub0() as pub:
            pub.dial(f"tcp://{mtls.controller}", block=True)
    # A TLS client that does not trust the server's CA is refused by its own side, as it should.
    with pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(socket.create_connection((host, port)), server_hostname=host)
    ca_env(mtls)
    token = mtls.login()
    assert mtls.alive_workers(token) == {"w1", "w2"}
    assert ref.get_json(mtls.url, token, "/status")["workers"]


def test_certs_command_makes_a_ca_a_server_and_workers(tmp_path):
    d = tmp_path / "tls"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "main.py", "certs", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    r = run("init", str(d), "--host", "dpip.example.org,10.0.0.5")
    assert r.returncode == 0, r.stderr
    assert run("worker", str(d), "w1").returncode == 0
    for key in ("ca.key", "server.key", "worker-w1.key"):
        assert stat.S_IMODE((d / key).stat().st_mode) == 0o600
    server = x509.load_pem_x509_certificate((d / "server.pem").read_bytes())
    alt = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"dpip.example.org", "localhost", "10.0.0.5"} <= set(alt.get_values_for_type(x509.DNSName))
    assert {str(a) for a in alt.get_values_for_type(x509.IPAddress)} >= {"10.0.0.5", "127.0.0.1", "::1"}
    worker = x509.load_pem_x509_certificate((d / "worker-w1.pem").read_bytes())
    assert worker.subject.rfc4514_string() == "CN=w1"
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    assert worker.issuer == server.issuer == ca.subject
    assert worker.verify_directly_issued_by(ca) is None
    # init again keeps the CA (workers' certificates stay good), renews the server's.
    again = run("init", str(d), "--host", "dpip.example.org")
    assert again.returncode == 0 and (d / "ca.pem").read_bytes() == ca.public_bytes(serialization.Encoding.PEM)
    bad = run("worker", str(d), "not a name")
    assert bad.returncode == 2 and "not a worker name" in bad.stderr and "Traceback" not in bad.stderr


def test_a_server_with_an_expired_certificate_says_so_and_exits(tmp_path):
    d = tmp_path / "tls"
    certs.init(d, ["127.0.0.1"])
    old = certs.issue(d, "old-server", "127.0.0.1", ["127.0.0.1"], days=1,
                      not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3))
    system = LocalSystem(tmp_path / "data", log_dir=tmp_path / "logs",
                         server_args=("--tls-cert", str(old.cert), "--tls-key", str(old.key)))
    proc = system.start_server(wait=False)
    with system:  # stopped whatever happens; its logs printed if this fails
        assert proc.wait(30) == 2
    log = (tmp_path / "logs" / "server.log").read_text()
    assert f"{old.cert} expired on" in log and "Traceback" not in log


def test_a_new_server_certificate_and_workers_reconnect_by_themselves(tmp_path, ca_env):
    """Without --tls-client-ca: the workers bring no certificate (only the CA they trust the
    server by); the server restarts with a renewed certificate and they come back."""
    system = LocalSystem(tmp_path / "data", log_dir=tmp_path / "logs", admin_password=ADMIN_PASSWORD,
                         tls_dir=tmp_path / "tls", mutual_tls=False, server_args=SPLIT)
    ca_env(system)
    with system:
        system.start_server()
        token = system.start_workers({"a": (), "b": ()})
        first = (tmp_path / "tls" / "server.pem").read_bytes()
        assert system.server is not None
        system.server.terminate()
        assert system.server.wait(30) == 0
        certs.init(tmp_path / "tls", ["127.0.0.1"])  # a new server certificate, same CA
        assert (tmp_path / "tls" / "server.pem").read_bytes() != first
        system.start_server()
        token = system.login()
        system.wait_workers({"a", "b"}, token, timeout=60)
        wid = workload(system.url, token)
        frames = {i: frame_png(i, 64, 48) for i in range(5)} | {5: noise_png(5)}
        for i, data in frames.items():
            assert ref.upload(system.url, token, wid, f"{i}.png", data).status == 200
        assert wait_completed(system.url, token, wid)["failed_images"] == []
        check_grayscale(system, token, wid, frames)
        served = ssl.get_server_certificate(("127.0.0.1", system.port))
        assert served.encode().strip() == (tmp_path / "tls" / "server.pem").read_bytes().strip()
        assert view(system.url, token, wid)["status"] == "completed"
        assert requests.get(system.url + "/status", headers={"Authorization": f"Bearer {token}"},
                            verify=system.ca_file, timeout=10).status_code == 200
