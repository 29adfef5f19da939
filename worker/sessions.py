"""A worker's end of its sessions: the listener the servers that welcomed it connect to
(:mod:`plane.stream`), one connection per session, each bound to the session whose key seals its
first message.

On a connection: every message from the server must be an :class:`~plane.wire.Exchange` sealed
with that session's key and fresh; the worker starts its jobs and stops its cancels at once
(:class:`Handler`), and a writer sends each batch of job ends from the session's outbox as soon
as there is one. A connection that does not prove itself within
:data:`~plane.stream.FIRST_MESSAGE_TIMEOUT` seconds, or sends anything else, is closed (and
counted); a new connection of a session replaces the old one, and the batches the old one did
not get acknowledged go again on it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Protocol

from common.aio import stop_tasks
from common.logs import LogLimiter
from plane import wire
from plane.stream import FIRST_MESSAGE_TIMEOUT, FrameConnection, StreamClosed, write_frame
from worker.link import ControllerLink, Refused

logger = logging.getLogger(__name__)

#: Connections at once that have not proven themselves yet.
MAX_UNPROVEN = 16


class Handler(Protocol):
    def exchange(self, msg: wire.Exchange, c: ControllerLink) -> None: ...


class Sessions:
    def __init__(self, handler: Handler, link_of_key: Callable[[str], ControllerLink],
                 tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.link_of_key = link_of_key
        self.tls = tls
        self.port = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._unproven = 0
        self._current: dict[int, asyncio.Task] = {}  # id(link) -> the task serving its connection
        self._tasks: set[asyncio.Task] = set()
        self._log = LogLimiter(logger)

    async def start(self, host: str, port: int = 0) -> int:
        self._server = await asyncio.get_running_loop().create_server(self._accept, host, port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await stop_tasks(list(self._tasks))

    def _refuse(self, why: str) -> None:
        self.refused += 1
        self._log.warning("refused", "session connection refused: %s (%d so far)", why, self.refused)

    def _accept(self) -> FrameConnection:
        """A new connection's protocol, and the task that serves it."""
        connection = FrameConnection(wire.MAX_SESSION_BYTES)
        task = asyncio.get_running_loop().create_task(self._serve(connection), name="session-connection")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return connection

    async def _serve(self, connection: FrameConnection) -> None:
        try:
            await self._connection(connection)
        except (StreamClosed, ConnectionError, ssl.SSLError):
            pass
        except Refused as e:
            self._refuse(str(e))
        except asyncio.CancelledError:
            pass  # our close(): end quietly
        finally:
            connection.close()

    async def _connection(self, connection: FrameConnection) -> None:
        if self._unproven >= MAX_UNPROVEN:
            raise Refused("too many connections that have not proven themselves")
        self._unproven += 1
        try:  # (a TLS handshake that never ends never makes the connection: timed out too)
            first = await asyncio.wait_for(self._first(connection), FIRST_MESSAGE_TIMEOUT)
        except TimeoutError:
            raise Refused(f"nothing sealed within {FIRST_MESSAGE_TIMEOUT:.0f}s") from None
        finally:
            self._unproven -= 1
        c, msg = self._open(first, None)
        old = self._current.get(id(c))
        if old is not None:
            old.cancel()  # the session's new connection replaces it
        self._current[id(c)] = asyncio.current_task()  # type: ignore[assignment]
        c.outbox.resend_unacked()  # what the old connection may not have delivered
        sender = asyncio.create_task(self._send(c, connection), name="session-send")
        try:
            self.handler.exchange(msg, c)
            while True:
                _, msg = self._open(await connection.read(), c)
                self.handler.exchange(msg, c)
        finally:
            if self._current.get(id(c)) is asyncio.current_task():
                del self._current[id(c)]
            await stop_tasks([sender])

    @staticmethod
    async def _first(connection: FrameConnection) -> bytes | bytearray:
        await connection.made
        return await connection.read()

    def _open(self, data: bytes | bytearray, bound: ControllerLink | None) -> tuple[ControllerLink, wire.Exchange]:
        try:
            sealed = wire.decode(data, wire.MAX_SESSION_BYTES)
        except wire.DecodeError as e:
            raise Refused(f"not a message: {e}") from None
        if not isinstance(sealed, wire.Sealed):
            raise Refused(f"an unsealed {sealed.TYPE}")
        c = self.link_of_key(sealed.kid) if bound is None else bound
        if c.link.channel is None or sealed.kid != c.link.channel.kid:
            raise Refused("sealed with another key than the connection's session")
        msg, fresh, _ = c.link.open(sealed)
        if not fresh or not isinstance(msg, wire.Exchange):
            raise Refused(f"a replayed or unexpected {msg.TYPE}")
        return c, msg

    @staticmethod
    async def _send(c: ControllerLink, writer: FrameConnection) -> None:
        """Each batch of ends, as soon as there is one, sealed for the session."""
        while True:
            results = await c.outbox.take(3600.0)
            if not results.batch or c.link.channel is None:
                continue
            parts, _ = c.link.channel.seal(results)
            write_frame(writer, parts)
            await writer.drain()
