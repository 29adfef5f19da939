"""Request/reply over nng with contexts, finite timeouts and no silent re-sends.

pynng's defaults bite (measured before DPIP existed): every timeout is infinite, ``Req0`` re-sends a request
every 60 s while the peer is slow, and a plain ``Rep0`` serves one request at a time. Both
classes here fix those once so callers cannot forget.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pynng

from common.aio import stop_tasks
from common.logs import LogLimiter
from plane import wire
from plane.seal import Channel

logger = logging.getLogger(__name__)

#: nng duration meaning "never": disables Req0's automatic re-send.
_NEVER_MS = 2**31 - 1


class RpcError(Exception):
    """A call failed: no peer, a timeout, or a reply that does not decode."""


class RpcClient:
    """One Req0 socket dialed to one peer; each call runs on its own context."""

    def __init__(self, address: str, timeout: float = 5.0, reconnect_min: float = 0.1,
                 tls: pynng.TLSConfig | None = None, max_bytes: int = wire.MAX_MESSAGE_BYTES) -> None:
        self.address = address
        self.timeout = timeout
        self.max_bytes = max_bytes  # replies larger than this are dropped by nng (and time out)
        self._sock = pynng.Req0(
            send_timeout=int(timeout * 1000),
            recv_timeout=int(timeout * 1000),
            recv_max_size=max_bytes,
        )
        self._sock.resend_time = _NEVER_MS
        self._sock.reconnect_time_min = int(reconnect_min * 1000)
        self._sock.reconnect_time_max = max(1000, int(reconnect_min * 1000))
        if tls is not None:  # for a tls+tcp:// address: whom we prove ourselves as, whom we trust
            self._sock.tls_config = tls
        # Non-blocking dial: nng keeps redialing in the background until the peer listens.
        self._sock.dial(address, block=False)

    async def call(self, msg: wire.Message, timeout: float | None = None,
                   channel: Channel | None = None) -> wire.Message:
        """Send ``msg`` (sealed on ``channel`` if given, and then only a reply sealed for this
        request is accepted) and return the decoded reply, within ``timeout`` seconds in all."""
        limit = self.timeout if timeout is None else timeout
        if channel is not None:
            parts, seq = channel.seal(msg)
        else:
            parts, seq = [wire.encode(msg)], 0
        ctx = self._sock.new_context()
        try:
            _context_timeouts(ctx, limit)  # the call's own limit, not the socket's default
            async with asyncio.timeout(limit):
                await ctx.asend_msg(nng_message(parts))
                reply = await ctx.arecv()
            return channel.open_reply(reply, seq, self.max_bytes) if channel is not None else wire.decode(reply)
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


def nng_message(parts: wire.Parts) -> pynng.Message:
    """One nng message of ``parts``, each copied once, by nng, into its buffer (a sealed
    message's frames are never joined in Python first)."""
    msg = pynng.Message(bytes(parts[0]))
    for part in parts[1:]:
        if len(part):
            err = pynng.lib.nng_msg_append(msg._nng_msg, pynng.ffi.from_buffer(part), len(part))
            if err:
                raise pynng.NNGException("cannot build the message", err)
    return msg


def _context_timeouts(ctx: pynng.Context, seconds: float) -> None:
    """Give a context the call's own send and receive timeouts. A context starts with its
    socket's, and nng ends the receive at that timeout whatever the caller's asyncio deadline:
    a 120 s job called on a client made with a 3 s default would fail after 3 s. (pynng has no
    context options, so nng's own setter is called.)"""
    ms = max(1, min(_NEVER_MS, int(seconds * 1000)))
    for option in (b"recv-timeout", b"send-timeout"):
        err = pynng.lib.nng_ctx_set_ms(ctx.context, option, ms)
        if err:
            raise pynng.NNGException(f"cannot set the context's {option.decode()}", err)


Handler = Callable[[wire.Message], Awaitable[wire.Message | wire.Parts]]


class RpcServer:
    """A Rep0 socket served by ``concurrency`` contexts, each a loop of receive, handle, reply.

    The handler gets the decoded request (often a :class:`~plane.wire.Sealed` envelope, which
    it opens itself) and returns a message or the pieces of a sealed reply. Garbage and handler
    failures are answered with an error :class:`~plane.wire.Ack`, counted, logged at a bounded
    rate; nothing a peer sends ends a serving loop.
    """

    def __init__(self, handler: Handler, concurrency: int, max_bytes: int = wire.MAX_MESSAGE_BYTES) -> None:
        self._handler = handler
        self._concurrency = concurrency
        self.max_bytes = max_bytes
        self._sock = pynng.Rep0(recv_max_size=max_bytes, send_timeout=5000)
        self._tasks: list[asyncio.Task[None]] = []
        self.bad_messages = 0
        self._log = LogLimiter(logger)

    def listen(self, address: str, tls: pynng.TLSConfig | None = None) -> str:
        """Listen on ``address`` (port 0 picks a free one; ``tls+tcp://`` with ``tls``); return
        the bound address."""
        if tls is not None:
            self._sock.tls_config = tls
        listener = self._sock.listen(address)
        return f"{address.split('://', 1)[0]}://{listener.local_address}"

    def start(self) -> None:
        """Start the serving loops in the running event loop."""
        self._tasks = [
            asyncio.create_task(self._serve(self._sock.new_context()), name=f"rpc-ctx-{i}")
            for i in range(self._concurrency)
        ]

    async def _reply_to(self, data: bytes) -> wire.Parts:
        try:
            request = wire.decode(data, self.max_bytes)
        except wire.VersionError as e:
            self.bad_messages += 1
            self._log.warning("version", "refused %s: a server of another version of DPIP (upgrade it, or this"
                              " worker)", e)
            return [wire.encode(wire.Ack(ok=False, error=f"refused {e}"))]
        except wire.DecodeError as e:
            self.bad_messages += 1
            self._log.warning("bad", "dropped bad RPC message (%d so far): %s", self.bad_messages, e)
            return [wire.encode(wire.Ack(ok=False, error="bad message"))]
        try:
            reply = await self._handler(request)
        except Exception:  # a handler bug must not kill the serving loop
            self._log.log(logging.ERROR, "handler", "RPC handler failed on %s", request.TYPE, exc_info=True)
            reply = wire.Ack(ok=False, error="internal error")
        return reply if isinstance(reply, list) else [wire.encode(reply)]

    async def _serve(self, ctx: pynng.Context) -> None:
        try:
            while True:
                data = await ctx.arecv()
                try:
                    await ctx.asend_msg(nng_message(await self._reply_to(data)))
                except pynng.NNGException as e:
                    logger.debug("could not send RPC reply: %s", e)
                    if isinstance(e, pynng.Closed):
                        return
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
