"""Connections guarded against clients that hold the server: slow or stalled requests, responses
left unread, too many connections from one address, and the parser's own errors said in JSON.

aiohttp's RequestHandler has a keep-alive timer and nothing else: a request's headers and body
may take forever and a client that reads nothing of our response keeps its connection, so a few
hundred slow sockets take every file descriptor. Here (the defaults are Apache's
``RequestReadTimeout header=20-40,MinRate=500 body=20,MinRate=500`` and nginx's keep-alive):

- a request's headers are due ``header_timeout`` after their first byte (after the connection
  on a fresh one), plus 1 s per ``min_rate`` bytes received, at most twice ``header_timeout``;
- its body is due ``body_timeout`` after the headers, plus 1 s per ``min_rate`` bytes, but only
  while the handler waits for it: a handler that works, or streams a response (``/events``),
  without reading a body is not the client's delay;
- an idle connection closes after ``keepalive_timeout`` (aiohttp's own timer does that);
- a connection whose writes stayed paused (its client reads nothing) for ``send_timeout`` is
  reset;
- connections are capped in all and per address group (an IPv6 /64 is one address), so that no
  address takes more than half; a refused one gets a JSON 503 with Retry-After.

One sweep, a few times a second at most, does the clock work for every connection: a timer per
connection would cost more, and a connection's hot path (``data_received``) only adds up the
bytes it received (the server handles ~250 tiny uploads a second and its CPU per request is
benchmarked).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import json
import logging
import resource
import socket
import struct
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import (
    BadHttpMethod,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
)
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import (
    _ErrInfo,  # what the parser queues for a request it rejects
)

from api.app import error_response
from api.net import Network, address_group, canonical
from common.logs import LogLimiter
from common.models import clipped, quoted

logger = logging.getLogger(__name__)
_log = LogLimiter(logger)  # every line here is one a client can provoke

#: File descriptors kept for the server's own use whatever the connections take: the datastore,
#: log files, nng's listeners and its pipes to workers, images being read or written.
FD_RESERVE = 128
#: Refused connections that may linger at once (each holds a descriptor for LINGER seconds).
MAX_LINGERING = 64
#: Seconds a refused connection is read (and what it sends dropped) after its 503, so that the
#: 503 is not destroyed by the reset a close with unread request bytes would send.
LINGER = 2.0
#: Retry-After of a refused connection, in seconds.
RETRY_AFTER = 5
#: The longest time between two sweeps; shorter when a timeout is short (1/4 of it).
SWEEP = 1.0


def raise_fd_limit() -> int:
    """Raise the soft limit of open files to the hard one (the usual soft 1024 is a few hundred
    connections); returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        except (ValueError, OSError) as e:
            logger.info("could not raise the open-file limit from %d to %d: %s", soft, want, e)
    return soft


def connections_for(fd_limit: int) -> int:
    """Client connections a file-descriptor limit affords: half of what the reserve leaves, as
    a connection may open a file too (an upload being written, an image being sent)."""
    return max(16, (fd_limit - FD_RESERVE) // 2)


@dataclass(frozen=True)
class ConnectionPolicy:
    """Deadlines and caps of client connections. A timeout of 0 (or less) is off; keep-alive 0
    closes each connection after its response."""

    header_timeout: float = 20.0
    body_timeout: float = 20.0
    min_rate: float = 500.0  # bytes a second that earn a slow client 1 s more per min_rate bytes
    keepalive_timeout: float = 75.0
    send_timeout: float = 60.0
    max_connections: int = 1000
    max_per_address: int = 256
    #: Addresses whose connections count in the total only: trusted reverse proxies, which
    #: carry many clients each.
    unlimited: tuple[Network, ...] = ()

    def header_allowance(self, received: int) -> float:
        """Seconds a request's headers may take after ``received`` bytes of them."""
        return min(self.header_timeout + self._earned(received), 2 * self.header_timeout)

    def body_allowance(self, received: int) -> float:
        return self.body_timeout + self._earned(received)

    def _earned(self, received: int) -> float:
        return received / self.min_rate if self.min_rate > 0 else 0.0

    @property
    def sweep_interval(self) -> float:
        timeouts = [t / 4 for t in (self.header_timeout, self.body_timeout, self.send_timeout) if t > 0]
        return max(0.05, min([SWEEP, *timeouts]))

    def describe(self) -> str:
        return (f"at most {self.max_connections} connections ({self.max_per_address} per address);"
                f" headers {self.header_timeout:g}-{2 * self.header_timeout:g} s, body {self.body_timeout:g} s,"
                f" at {self.min_rate:g} B/s; keep-alive {self.keepalive_timeout:g} s;"
                f" unread responses {self.send_timeout:g} s")


def parser_error(exc: HttpProcessingError) -> str:
    """What a request that aiohttp's parser rejected did wrong, quoting at most ~80 characters of
    it (aiohttp's own message echoes 100 bytes of a line too long, and more of others)."""
    if isinstance(exc, LineTooLong):
        return f"request line or header too long (at most {exc.args[1]} bytes each)"
    if isinstance(exc, InvalidHeader):
        return f"invalid header: {quoted(exc.hdr)}"
    if isinstance(exc, BadHttpMethod) and "HTTPS" in exc.message:
        return "this port speaks HTTP, not HTTPS"
    # llhttp's messages: what is wrong (a line or two, ending in ':'), the line it was in as
    # bytes, a caret under the fault.
    lines = [line.strip() for line in exc.message.splitlines() if line.strip()]
    what = [line.rstrip(":") for line in lines if not line.startswith(("b'", 'b"', "^"))]
    where = [line for line in lines if line.startswith(("b'", 'b"')) and len(line) > 3]  # not b''
    text = "malformed request: " + (clipped(": ".join(what)) if what else "bad syntax")
    return f"{text}: {clipped(where[0])}" if where else text


def raw_json_response(status: int, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP response, for a connection that has no request object to answer."""
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json; charset=utf-8",
            f"Content-Length: {len(body)}", "Connection: close",
            *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_RETRY = {"Retry-After": str(RETRY_AFTER)}
TOO_MANY = raw_json_response(503, "the server has too many connections; try again later", _RETRY)
TOO_MANY_FROM_YOU = raw_json_response(503, "too many connections from your address; try again later", _RETRY)
TOO_SLOW = raw_json_response(408, "the request's headers took too long")
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets at once


class Phase(enum.Enum):
    """What a connection waits for."""
    HEADERS = "headers"  # a request's headers (a fresh connection, or bytes after an idle one)
    BODY = "body"  # a request's body, read by its handler
    BUSY = "busy"  # our handler: nothing is due from the client
    IDLE = "idle"  # the next request (keep-alive; aiohttp's timer closes it)


class GuardedHandler(web.RequestHandler):
    """aiohttp's connection protocol, with the deadlines of a :class:`ConnectionPolicy` (checked
    by its server's sweep) and JSON errors."""

    __slots__ = ("_guard", "_phase", "_since", "_mark", "_received", "_body", "_paused_at")

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard: GuardedServer | None = manager
        self._phase = Phase.HEADERS
        self._since = 0.0  # when the phase began (loop time)
        self._mark = 0  # bytes received when it began
        self._received = 0
        self._body: StreamReader | None = None
        self._paused_at = 0.0  # when our writes were paused (0: they are not)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert self._guard is not None
        refusal = self._guard.admit(self, transport)
        if refusal is None:
            self._since = self._loop.time()
            super().connection_made(transport)
            return
        # Refused: no request task. _force_close makes data_received drop what the client sends.
        BaseProtocol.connection_made(self, transport)
        self._force_close = True
        self._guard.refuse(self, transport, refusal)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._guard is not None:
            self._guard.forget(self)
            self._guard = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._received += len(data)  # all the sweep needs to know of the client's progress
        super().data_received(data)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._paused_at = self._loop.time()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._paused_at = 0.0

    def request_started(self, payload: StreamReader) -> None:
        """A request's headers are in: its body is due next, or nothing is."""
        if payload.is_eof():
            self._phase, self._body = Phase.BUSY, None
        else:
            self._phase, self._body = Phase.BODY, payload
            self._since, self._mark = self._loop.time(), self._received

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            # _body stays: aiohttp may still read (and drop) what is left of it, for 10 s.
            self._phase, self._mark = Phase.IDLE, self._received

    def check(self, now: float, policy: ConnectionPolicy) -> None:
        """Close the connection if its client is late (the sweep calls this)."""
        if self._paused_at and 0 < policy.send_timeout < now - self._paused_at:
            self._cut("send timeout", "left our response unread for %.0f s", now - self._paused_at, reset=True)
            return
        phase, got, body = self._phase, self._received - self._mark, self._body
        if body is not None and body.is_eof():
            body = self._body = None
            if phase is Phase.BODY:
                phase = self._phase = Phase.BUSY
        if body is not None and self._messages:
            self._refuse_body()
        elif phase is Phase.IDLE:
            if got and body is None:  # the next request has begun
                self._phase, self._since = Phase.HEADERS, now
        elif phase is Phase.HEADERS:
            if policy.header_timeout > 0 and now - self._since > policy.header_allowance(got):
                if got and self.transport is not None:  # a request was begun: say why it ends
                    self.transport.write(TOO_SLOW)
                self._cut("header timeout", "sent %d bytes of headers in %.0f s", got, now - self._since)
        elif phase is Phase.BODY:
            assert body is not None
            # _waiter: the handler waits for the body (aiohttp has no public word for it). Time
            # the handler spends elsewhere is not counted as the client's only while it lasts.
            if (body._waiter is not None and policy.body_timeout > 0
                    and now - self._since > policy.body_allowance(got)):
                self._cut("body timeout", "sent %d bytes of a body in %.0f s", got, now - self._since)

    def _refuse_body(self) -> None:
        """A message queued behind an unfinished body is the parser's error on that body (no
        request can follow a body before its end). aiohttp then forgets the body's reader, so
        whoever reads it would wait forever and the error would never be answered: answer it."""
        msg = self._messages[-1][0]
        exc = msg.exc if isinstance(msg, _ErrInfo) else None
        text = parser_error(exc) if isinstance(exc, HttpProcessingError) else "malformed request body"
        request = self._current_request
        if self.transport is not None and (request is None or request.writer.output_size == 0):
            self.transport.write(raw_json_response(400, text))
        self._cut("bad body", "sent a malformed body: %s", text)

    def _cut(self, category: str, fmt: str, *args: object, reset: bool = False) -> None:
        _log.log(logging.INFO, category, "closed the connection of %s: it " + fmt, self._peer(), *args)
        transport = self.transport
        if reset and transport is not None:
            # A client that reads nothing would hold a plain close (asyncio flushes first) and
            # leave the kernel its unsent buffer: reset instead.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                except OSError:
                    pass  # closed already
            transport.abort()
        self.force_close()

    def _peer(self) -> str:
        peer = self.peername
        return str(peer[0]) if isinstance(peer, tuple) else "?"

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's own errors (a request its parser rejects, a handler's escaped exception) as
        JSON, like every other error; its statuses kept."""
        if request.writer.output_size > 0:
            raise ConnectionError("a response was sent already: the error can only close the connection")
        if isinstance(exc, HttpProcessingError):
            text = parser_error(exc)
            _log.log(logging.INFO, "bad request", "bad request from %s: %s", self._peer(), text)
        elif status == 504:
            text = "the request took too long"
        else:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            text = "internal server error"
        resp = error_response(status, text)
        resp.force_close()
        return resp


class GuardedServer(web.Server):
    """aiohttp's server of connections, making :class:`GuardedHandler` ones: it admits or refuses
    each connection and sweeps them all for late clients."""

    def __init__(self, plain: web.Server, policy: ConnectionPolicy) -> None:
        # The Application built ``plain`` (its request factory, its handler arguments): the
        # same server, with our protocol and a hook on each request.
        super().__init__(plain.request_handler, request_factory=self._start_request,
                         handler_cancellation=plain.handler_cancellation, **plain._kwargs)
        self.policy = policy
        self._app_request = plain.request_factory
        self._admitted: dict[GuardedHandler, str | None] = {}  # -> its address group (None: uncapped)
        self._groups: dict[str, int] = {}
        self._lingering: dict[GuardedHandler, float] = {}  # refused -> when it closes
        self._sweeper = self._loop.create_task(self._sweep_forever(), name="connection-sweep")

    def __call__(self) -> GuardedHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)

    def _start_request(self, message: Any, payload: StreamReader, protocol: GuardedHandler,
                       writer: Any, task: asyncio.Task) -> web.BaseRequest:
        protocol.request_started(payload)
        return self._app_request(message, payload, protocol, writer, task)

    def admit(self, handler: GuardedHandler, transport: asyncio.BaseTransport) -> bytes | None:
        """Count a new connection in, or return the response that refuses it."""
        group = self._group_of(transport.get_extra_info("peername"))
        if len(self._admitted) >= self.policy.max_connections:
            return TOO_MANY
        if group is not None and self._groups.get(group, 0) >= self.policy.max_per_address:
            return TOO_MANY_FROM_YOU
        self._admitted[handler] = group
        if group is not None:
            self._groups[group] = self._groups.get(group, 0) + 1
        return None

    def _group_of(self, peer: Any) -> str | None:
        if not isinstance(peer, tuple):
            return None  # not an IP connection
        address = canonical(str(peer[0]))
        if self.policy.unlimited:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                pass
            else:
                if any(ip in net for net in self.policy.unlimited):
                    return None
        return address_group(address)

    def refuse(self, handler: GuardedHandler, transport: Any, response: bytes) -> None:
        why = "too many connections" if response is TOO_MANY else "too many connections from its address"
        peer = transport.get_extra_info("peername")
        _log.warning("refused", "refused a connection from %s: %s",
                     peer[0] if isinstance(peer, tuple) else "?", why)
        transport.write(response)
        if len(self._lingering) < MAX_LINGERING and transport.can_write_eof():
            transport.write_eof()  # the client reads the 503, then its end; ours reads and drops
            self._lingering[handler] = self._loop.time() + LINGER
        else:
            transport.close()

    def forget(self, handler: GuardedHandler) -> None:
        """A connection closed: count it out."""
        if self._lingering.pop(handler, None) is not None or handler not in self._admitted:
            return
        group = self._admitted.pop(handler)
        if group is not None:
            left = self._groups[group] - 1
            if left:
                self._groups[group] = left
            else:
                del self._groups[group]

    def sweep(self, now: float) -> None:
        """Close the connections whose clients are late, and refused ones done lingering."""
        for handler, until in list(self._lingering.items()):
            if now >= until:
                handler.force_close()
        for handler in list(self._admitted):
            handler.check(now, self.policy)

    async def _sweep_forever(self) -> None:
        interval = self.policy.sweep_interval
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep(self._loop.time())
            except Exception:  # a bug here must not end the protection of every connection
                _log.log(logging.ERROR, "sweep", "the connection sweep failed", exc_info=True)

    async def shutdown(self, timeout: float | None = None) -> None:
        try:
            await super().shutdown(timeout)  # slow clients stay timed while handlers finish
        finally:
            self._sweeper.cancel()
            for handler in list(self._lingering):
                handler.force_close()


class GuardedRunner(web.AppRunner):
    """An AppRunner whose connections follow ``policy``."""

    __slots__ = ("_policy",)

    def __init__(self, app: web.Application, policy: ConnectionPolicy, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=max(0.0, policy.keepalive_timeout), **kwargs)
        self._policy = policy

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self._policy)
