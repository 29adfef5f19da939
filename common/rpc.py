"""Request/reply over nng with contexts, finite timeouts and no silent re-sends.

pynng's defaults bite (see MEASURED.md): every timeout is infinite, ``Req0`` re-sends a request
every 60 s while the peer is slow, and a plain ``Rep0`` serves one request at a time. Both
classes here fix those once so callers cannot forget.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pynng

from common import wire
from common.aio import stop_tasks

logger = logging.getLogger(__name__)

#: nng duration meaning "never": disables Req0's automatic re-send.
_NEVER_MS = 2**31 - 1


class RpcError(Exception):
    """A call failed: no peer, a timeout, or a reply that does not decode."""


class RpcClient:
    """One Req0 socket dialed to one peer; each call runs on its own context."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout
        self._sock = pynng.Req0(
            send_timeout=int(timeout * 1000),
            recv_timeout=int(timeout * 1000),
            recv_max_size=wire.MAX_MESSAGE_BYTES,
        )
        self._sock.resend_time = _NEVER_MS
        self._sock.reconnect_time_min = 100
        self._sock.reconnect_time_max = 1000
        # Non-blocking dial: nng keeps redialing in the background until the peer listens.
        self._sock.dial(address, block=False)

    async def call(self, msg: wire.Message, timeout: float | None = None) -> wire.Message:
        """Send ``msg`` and return the decoded reply, within ``timeout`` seconds in all."""
        limit = self.timeout if timeout is None else timeout
        ctx = self._sock.new_context()
        try:
            async with asyncio.timeout(limit):
                await ctx.asend(wire.encode(msg))
                data = await ctx.arecv()
            return wire.decode(data)
        except (TimeoutError, pynng.Timeout) as e:
            raise RpcError(f"{msg.TYPE} to {self.address}: no reply within {limit:.1f}s") from e
        except pynng.NNGException as e:
            raise RpcError(f"{msg.TYPE} to {self.address}: {e}") from e
        except wire.DecodeError as e:
            raise RpcError(f"{msg.TYPE} to {self.address}: bad reply: {e}") from e
        finally:
            try:
                ctx.close()
            except pynng.Closed:
                pass  # the socket was closed under us (the peer was declared dead)

    def close(self) -> None:
        """Close the socket; calls in flight fail with :class:`RpcError`."""
        self._sock.close()


Handler = Callable[[wire.Message], Awaitable[wire.Message]]


class RpcServer:
    """A Rep0 socket served by ``concurrency`` contexts, each a loop of receive, handle, reply.

    Garbage is answered with an error :class:`~common.wire.Ack`, counted and logged, never fatal.
    """

    def __init__(self, handler: Handler, concurrency: int) -> None:
        self._handler = handler
        self._concurrency = concurrency
        self._sock = pynng.Rep0(recv_max_size=wire.MAX_MESSAGE_BYTES, send_timeout=5000)
        self._tasks: list[asyncio.Task[None]] = []
        self.bad_messages = 0

    def listen(self, address: str) -> str:
        """Listen on ``address`` (port 0 picks a free one); return the bound tcp:// address."""
        listener = self._sock.listen(address)
        return f"tcp://{listener.local_address}"

    def start(self) -> None:
        """Start the serving loops in the running event loop."""
        self._tasks = [
            asyncio.create_task(self._serve(self._sock.new_context()), name=f"rpc-ctx-{i}")
            for i in range(self._concurrency)
        ]

    async def _serve(self, ctx: pynng.Context) -> None:
        try:
            while True:
                data = await ctx.arecv()
                try:
                    request = wire.decode(data)
                except wire.DecodeError as e:
                    self.bad_messages += 1
                    if self.bad_messages == 1 or self.bad_messages % 100 == 0:
                        logger.warning("dropped bad RPC message (%d so far): %s", self.bad_messages, e)
                    reply: wire.Message = wire.Ack(ok=False, error=f"bad message: {e}")
                else:
                    try:
                        reply = await self._handler(request)
                    except Exception as e:  # a handler bug must not kill the serving loop
                        logger.exception("RPC handler failed on %s", request.TYPE)
                        reply = wire.Ack(ok=False, error=f"internal error: {e}")
                try:
                    await ctx.asend(wire.encode(reply))
                except pynng.NNGException as e:
                    logger.info("could not send RPC reply: %s", e)
        except (pynng.Closed, asyncio.CancelledError):
            pass
        finally:
            try:
                ctx.close()
            except pynng.Closed:
                pass

    async def close(self) -> None:
        """Close the socket (failing every pending receive), then stop the serving loops."""
        self._sock.close()
        await stop_tasks(self._tasks)
