"""Slow clients cannot hold the server (issue 21, items 5 and 10): a request's headers and its
body have deadlines that a minimum rate extends, idle connections close, a client that reads
nothing of its response is reset, connections are capped per address and in all (the total from
the open-file limit), and what aiohttp's parser rejects is answered in JSON, briefly.

A real server (``main.py``) with short timeouts, spoken to over raw sockets."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

import pytest
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from PIL import Image

from api.connections import connections_for, parser_error
from server.settings import ServerSettings, connection_policy
from tests.helpers import ADMIN_PASSWORD, LocalSystem, ref, wait_until

HEADER, BODY, KEEPALIVE, SEND = 2.0, 2.0, 3.0, 2.0
FLAGS = ("--header-timeout", str(HEADER), "--body-timeout", str(BODY), "--min-rate", "500",
         "--keepalive-timeout", str(KEEPALIVE), "--send-timeout", str(SEND))
SWEEP = 0.5  # the server sweeps every 1/4 of its shortest timeout
TCP_CLOSE = 7  # tcp_info.tcpi_state of a connection reset by its peer


# -- talking to the server byte by byte --------------------------------------------------------

_sockets: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets():
    yield
    while _sockets:
        _sockets.pop().close()


def connect(system: LocalSystem, source: str = "127.0.0.1", receive_buffer: int = 0) -> socket.socket:
    """A client connection from ``source`` (any 127.x.y.z is this machine), closed after the test."""
    s = socket.socket()
    _sockets.append(s)
    if receive_buffer:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    s.bind((source, 0))
    s.connect(("127.0.0.1", system.port))
    return s


def until_closed(s: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (EOF or reset); fails if it
    is still open after ``timeout``."""
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"still open after {timeout:.0f} s; got {out[:200]!r}") from None
    return out


def still_open_after(s: socket.socket, seconds: float) -> bytes:
    """What the server sends in ``seconds``; fails if it closes the connection meanwhile."""
    deadline, out = time.monotonic() + seconds, b""
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        assert chunk, f"closed after {seconds - left:.1f} s"
        out += chunk
    return out


def trickle(s: socket.socket, pieces: list[bytes], every: float, on_the_way=None) -> tuple[bytes, float, int]:
    """Send ``pieces`` one per ``every`` seconds until the server answers or closes: its answer
    (b"" for a close), the seconds it took and how many pieces went. Between two pieces it
    waits on the socket, so it notices an answer at once. ``on_the_way()`` runs after the
    second piece, while this client is still being slow."""
    start = time.monotonic()
    for n, piece in enumerate(pieces):
        try:
            s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            return b"", time.monotonic() - start, n
        if n == 1 and on_the_way is not None:
            on_the_way()
        s.settimeout(every)
        try:
            answer = s.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            answer = b""
        if answer:
            answer += until_closed(s, 5)
        return answer, time.monotonic() - start, n + 1
    raise AssertionError(f"the server took all {len(pieces)} pieces")


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def json_error(raw: bytes, status: int) -> str:
    """The error message of a JSON error response with ``status``."""
    got, headers, body = parse(raw)
    assert got == status, raw[:300]
    assert headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    assert set(doc) == {"error"} and doc["error"], doc
    return doc["error"]


def exchange(s: socket.socket, request: bytes) -> tuple[int, bytes]:
    """One request on a kept-alive connection: the status and body of its response."""
    s.settimeout(10)
    s.sendall(request)
    r = http.client.HTTPResponse(s)
    r.begin()
    return r.status, r.read()


def get(path: str, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: dpip\r\n{auth}\r\n".encode()


def noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress: as many bytes as pixels x 3."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(buf, "PNG", compress_level=0)
    return buf.getvalue()


def upload_head(token: str, content_type: str, length: int) -> bytes:
    return (f"POST /images HTTP/1.1\r\nHost: dpip\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n").encode()


def login(system: LocalSystem) -> str:
    return ref.login(system.url, "admin", ADMIN_PASSWORD)


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


# -- headers -----------------------------------------------------------------------------------

def test_headers_sent_a_line_at_a_time_are_cut_off_while_others_are_served(make_system):
    """The slowloris: a header line every 0.25 s, forever. Its request gets a 408 and its
    connection closes after the header deadline; a normal client is served meanwhile."""
    system = make_system(*FLAGS)
    slow = connect(system)
    served = []
    lines = [b"GET /status HTTP/1.1\r\n"] + [b"X-Slow-%d: still coming\r\n" % i for i in range(200)]
    answer, took, sent = trickle(slow, lines, 0.25, lambda: served.append(login(system)))
    assert served and served[0], "the normal client was not served"
    assert "took too long" in json_error(answer, 408)
    # ~30 bytes a second earn it nearly nothing: cut after the header timeout, long before the
    # client was done (it had 50 s of lines to send).
    assert took >= HEADER and sent < len(lines) / 2, (took, sent)


def send_slowly(s: socket.socket, data: bytes, piece: int) -> tuple[int, bytes]:
    """``data`` in pieces of ``piece`` bytes a quarter of a second apart (the connection must
    stay open all along); the answer's status and body."""
    *pieces, last = chunks(data, piece)
    for part in pieces:
        s.sendall(part)
        assert still_open_after(s, 0.25) == b""
    return exchange(s, last)


def test_headers_at_a_good_rate_may_take_longer_than_the_header_timeout(make_system):
    """1 s more per 500 bytes received: 4 KB of headers at ~1.6 KB/s (2.5 s) are served."""
    system = make_system(*FLAGS)
    token = login(system)
    headers = "".join(f"X-Padding-{i}: {'p' * 70}\r\n" for i in range(48))
    request = f"GET /status HTTP/1.1\r\nHost: dpip\r\nAuthorization: Bearer {token}\r\n{headers}\r\n".encode()
    s = connect(system)
    start = time.monotonic()
    status, body = send_slowly(s, request, 400)
    assert time.monotonic() - start > HEADER
    assert status == 200 and "workers" in json.loads(body)


def test_an_idle_fresh_connection_is_closed_after_the_header_timeout(make_system):
    system = make_system(*FLAGS)
    s = connect(system)
    start = time.monotonic()
    assert until_closed(s, HEADER + 5) == b""  # nothing was asked: nothing is answered
    assert time.monotonic() - start >= HEADER - 0.1


def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(make_system):
    system = make_system(*FLAGS)
    s = connect(system)
    assert exchange(s, get("/status"))[0] == 401
    assert exchange(s, get("/status"))[0] == 401  # kept alive
    start = time.monotonic()
    assert until_closed(s, KEEPALIVE + 5) == b""
    assert time.monotonic() - start >= KEEPALIVE - 0.1


# -- bodies ------------------------------------------------------------------------------------

def test_a_body_trickled_below_the_minimum_rate_is_cut_off_while_an_upload_succeeds(make_system):
    system = make_system(*FLAGS)
    token = login(system)
    wid = ref.create_workload(system.url, token)["workload_id"]
    body, ctype = ref.multipart({"workload_id": wid, "type": "original"}, "data", "0.png", noise_png(40, 30))
    slow = connect(system)
    slow.sendall(upload_head(token, ctype, len(body)))
    uploads = []

    def normal_upload() -> None:
        uploads.append(ref.upload(system.url, token, wid, "1.png", noise_png(40, 30)))

    # 10 bytes every 0.25 s: 40 B/s, far below 500 B/s.
    answer, took, sent = trickle(slow, chunks(body, 10), 0.25, normal_upload)
    assert answer == b""  # closed: mid-body there is no one to answer
    assert took >= BODY
    assert sent * 10 < len(body) / 2, "cut off long before the body was sent"
    assert uploads and uploads[0].status == 200, uploads[0].body
    assert [i["image_id"] for i in ref.get_json(system.url, token, f"/images?workload_id={wid}")] == [0]


def test_a_body_at_a_good_rate_may_take_longer_than_the_body_timeout(make_system):
    """~12 KB at ~4 KB/s (3 s) is within body_timeout + 1 s per 500 bytes: stored."""
    system = make_system(*FLAGS)
    token = login(system)
    wid = ref.create_workload(system.url, token)["workload_id"]
    body, ctype = ref.multipart({"workload_id": wid, "type": "original"}, "data", "0.png", noise_png(64, 60))
    s = connect(system)
    s.sendall(upload_head(token, ctype, len(body)))
    start = time.monotonic()
    status, answer = send_slowly(s, body, 1000)
    assert time.monotonic() - start > BODY
    assert status == 200, answer
    assert json.loads(answer)["image_id"] == 0


def test_a_malformed_chunked_body_is_answered_in_json_at_once(make_system):
    """aiohttp's parser gives up on the body and forgets it: its handler would wait for it
    until the body deadline, and the error would never be answered."""
    system = make_system("--body-timeout", "60")
    token = login(system)
    s = connect(system)
    s.sendall((f"POST /images HTTP/1.1\r\nHost: dpip\r\nAuthorization: Bearer {token}\r\nExpect: 100-continue\r\n"
               f"Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
    # The server says to go on once the request is routed to its handler, which then waits for the body.
    s.settimeout(10)
    interim = b""
    while b"\r\n\r\n" not in interim:
        interim += s.recv(1024) or b"!"
    assert interim.startswith(b"HTTP/1.1 100"), interim
    s.sendall(b"3\r\n--b\r\nzz\r\n")
    # Answered at once: within 10 s, where the body deadline is 60 s.
    message = json_error(interim.split(b"\r\n\r\n", 1)[1] + until_closed(s, 10), 400)
    assert "chunk" in message and len(message) < 200


# -- long-lived responses ----------------------------------------------------------------------

def test_an_event_stream_lives_past_every_deadline(make_system):
    """GET /events: the client sends nothing more and the handler streams; neither a header,
    body nor keep-alive deadline applies."""
    system = make_system(*FLAGS)
    token = login(system)
    s = connect(system)
    s.sendall(get("/events", token))
    first = still_open_after(s, 1.0)
    assert first.startswith(b"HTTP/1.1 200") and b"event: snapshot" in first
    still_open_after(s, 2 * HEADER + BODY + KEEPALIVE)
    wid = ref.create_workload(system.url, token)["workload_id"]
    later = []

    def streamed() -> bool:
        later.append(still_open_after(s, 0.5))
        return wid.encode() in b"".join(later)

    wait_until(streamed, 10, "the new workload on the stream")
    assert b"event: changes" in b"".join(later)


def test_a_client_that_reads_nothing_of_its_response_is_reset(make_system):
    """A download the client does not read: once our writes have stayed paused for the send
    timeout, the connection is reset (a plain close would wait for the client forever)."""
    system = make_system(*FLAGS)
    token = login(system)
    wid = ref.create_workload(system.url, token)["workload_id"]
    big = noise_png(1700, 1700)  # 8.7 MB: more than every buffer on the way
    assert ref.upload(system.url, token, wid, "0.png", big).status == 200
    s = connect(system, receive_buffer=4096)
    s.sendall(get(f"/images/0?workload_id={wid}&type=original", token))

    def state() -> int:
        return struct.unpack("B", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]

    start = time.monotonic()
    wait_until(lambda: state() == TCP_CLOSE, SEND + 10, "the server to reset the connection")
    assert time.monotonic() - start >= SEND - 0.1
    received = until_closed(s, 5)
    assert received.startswith(b"HTTP/1.1 200") and len(received) < len(big)


# -- connection caps ---------------------------------------------------------------------------

def test_connections_are_capped_per_address_and_in_all(make_system):
    system = make_system("--max-connections", "6", "--max-connections-per-address", "3")
    held = []
    for _ in range(3):
        held.append(connect(system))
        assert exchange(held[-1], get("/status"))[0] == 401  # served, and kept open
    # A fourth from 127.0.0.1: refused in JSON, even when its request is already sent.
    extra = connect(system)
    extra.sendall(get("/status"))
    refused = until_closed(extra, 10)
    assert "your address" in json_error(refused, 503)
    assert int(parse(refused)[1]["retry-after"]) >= 1
    # Another address is served, up to its own cap; then the total is reached for everyone.
    for _ in range(3):
        held.append(connect(system, "127.0.0.2"))
        assert exchange(held[-1], get("/status"))[0] == 401
    assert "too many connections" in json_error(until_closed(connect(system, "127.0.0.3"), 10), 503)
    # A connection that closes frees its place (once the server has seen it close).
    held[0].close()
    wait_until(lambda: exchange(connect(system, "127.0.0.3"), get("/status"))[0] == 401, 10,
               "a place to be free")


def test_the_total_comes_from_the_open_file_limit(tmp_path: Path):
    """Started with 200 open files allowed (and no higher hard limit): 128 kept for the server,
    half the rest for connections (36), at most half of those from one address (18)."""
    assert connections_for(200) == 36
    limit = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200));"
             " os.execv(sys.argv[1], sys.argv[1:])")
    with LocalSystem(tmp_path / "data", log_dir=tmp_path / "logs", admin_password=ADMIN_PASSWORD) as system:
        system.start_server(prefix=(sys.executable, "-c", limit))
        for _ in range(18):
            assert exchange(connect(system), get("/status"))[0] == 401  # served, and kept open
        assert "your address" in json_error(until_closed(connect(system), 10), 503)
        assert exchange(connect(system, "127.0.0.2"), get("/status"))[0] == 401


def test_the_file_limit_is_raised_to_the_hard_limit(tmp_path: Path):
    limit = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (200, 4096));"
             " os.execv(sys.argv[1], sys.argv[1:])")
    with LocalSystem(tmp_path / "data", log_dir=tmp_path / "logs", admin_password=ADMIN_PASSWORD) as system:
        proc = system.start_server(prefix=(sys.executable, "-c", limit))
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] \
            == [["4096", "4096"]]


def test_the_per_address_cap_is_at_most_half_the_total():
    settings = ServerSettings(max_connections=10, max_connections_per_address=256)
    assert connection_policy(settings, 20000).max_per_address == 5
    derived = connection_policy(ServerSettings(), 20000)
    assert derived.max_connections == (20000 - 128) // 2 and derived.max_per_address == 256


# -- what the parser rejects -------------------------------------------------------------------

def test_what_the_parser_rejects_is_a_short_json_error(make_system):
    system = make_system()
    long = "a" * 9000
    cases = {
        "request line": f"GET /{long} HTTP/1.1\r\nHost: dpip\r\n\r\n",
        "header value": f"GET / HTTP/1.1\r\nHost: dpip\r\nX-Big: {long}\r\n\r\n",
        "header name": f"GET / HTTP/1.1\r\nHost: dpip\r\nX-{long}: v\r\n\r\n",
        "method": f"G@T /{long[:200]} HTTP/1.1\r\nHost: dpip\r\n\r\n",
        "header": f"GET / HTTP/1.1\r\nHost: dpip\r\nBad Header{long[:200]}: x\r\n\r\n",
        "chunking": f"POST /login HTTP/1.1\r\nHost: dpip\r\nTransfer-Encoding: chunked\r\n\r\n{long[:200]}\r\n",
        "version": "GET / HTTP/9.9\r\nHost: dpip\r\n\r\n",
        "binary": "\x00\x01\x02garbage\r\n\r\n",
    }
    for what, request in cases.items():
        s = connect(system)
        s.sendall(request.encode("latin-1"))
        answer = until_closed(s, 10)
        message = json_error(answer, 400)
        assert len(answer) < 400 and "a" * 81 not in message, (what, message)
    assert "too long" in parser_error(LineTooLong(b"x" * 100, 8190))
    assert len(parser_error(BadHttpMessage("Invalid header value char:\n\n  b'" + long + "'\n   ^"))) < 200
