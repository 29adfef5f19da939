"""The session stream's framing and TLS: sealed messages over one TCP connection (TLS when the
plane has it), each a 4-byte length and the message.

Why not nng for this one channel: measured on these machines, a round trip over pynng's req/rep
costs about 540 us of CPU for both ends (an nng aio, a cffi callback and a future per send and
per receive, and wake-ups from nng's own threads), over an asyncio stream 26 us. The session
carries every job and every result, so it is the one place where that matters; membership
(pub/sub heartbeats) and the welcome stay on nng.

Both ends receive through :class:`FrameConnection` (a ``BufferedProtocol``: an image's frame
is read from the socket straight into buffers of its own); :func:`read_frame` and
:func:`write_frame` also serve plain asyncio streams (the tests' hostile peers).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import struct
import tempfile
from pathlib import Path

from plane import wire

_LENGTH = struct.Struct("!I")
#: How long a connection may take to say who it is (its first sealed message).
FIRST_MESSAGE_TIMEOUT = 10.0


class StreamClosed(Exception):
    """The connection ended (or sent a frame larger than allowed)."""


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = wire.MAX_SESSION_BYTES) -> bytes:
    """One message; StreamClosed at the end of the stream or on a length beyond ``max_bytes``
    (read no further: nothing that large is held)."""
    try:
        (n,) = _LENGTH.unpack(await reader.readexactly(4))
        if n > max_bytes:
            raise StreamClosed(f"a frame of {n} bytes (at most {max_bytes})")
        return await reader.readexactly(n)
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError) as e:
        raise StreamClosed(str(e) or type(e).__name__) from None


def write_frame(writer: asyncio.StreamWriter | FrameConnection, parts: wire.Parts) -> None:
    """Queue one message (its pieces as they are: nothing joined here)."""
    writer.writelines([_LENGTH.pack(sum(len(p) for p in parts)), *parts])


#: Bytes staged at once for small frames; a frame this large or more is received straight into
#: a buffer of its own.
STAGE_BYTES = 256 * 1024
BIG_FRAME = 64 * 1024
#: A large frame is received into pieces of at most this size, each made when the bytes before
#: it have arrived: a length announced is never memory taken before its bytes come (a peer that
#: announces the most a frame may hold and sends nothing holds one piece).
PIECE_BYTES = 1 << 20
#: Frames received and not yet taken before the connection stops reading (flow control).
MAX_QUEUED = 64


class FrameConnection(asyncio.BufferedProtocol):
    """One session connection as a protocol: frames (a 4-byte length, then the message) read
    with :meth:`read`, written with :meth:`writelines` and :meth:`drain`.

    Received without a stream reader: a large frame (an image) goes straight from the socket
    into buffers of its own (``BufferedProtocol``: the kernel copies it into place; pieces of at
    most :data:`PIECE_BYTES`, each made as the bytes come, joined once at the end). Measured
    here, a 1.44 MB frame cost the receiving process 0.93-1.0 ms of CPU through
    ``StreamReader.readexactly`` (a bytes object per socket read, a growing bytearray, a wake-up
    of the reader per read, a copy out) and about 0.3 ms this way. Small frames are cut out of
    one staging buffer. A frame longer than ``max_bytes`` closes the connection before anything
    of it is held."""

    def __init__(self, max_bytes: int = wire.MAX_SESSION_BYTES) -> None:
        self.max_bytes = max_bytes
        self.transport: asyncio.Transport | None = None
        self._stage = bytearray(STAGE_BYTES)
        self._view = memoryview(self._stage)
        self._start = self._end = 0  # the staged bytes not yet cut into frames
        self._big: list[bytearray] | None = None  # a large frame's pieces, being received
        self._big_size = self._big_got = self._piece_at = 0
        self._frames: collections.deque[bytes | bytearray] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed: StreamClosed | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drainers: list[asyncio.Future[None]] = []
        self.made: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- the transport's side ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.made.done():
            self.made.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            if self._piece_at == len(self._big[-1]):  # that piece is full: the next one
                self._big.append(bytearray(min(PIECE_BYTES, self._big_size - self._big_got)))
                self._piece_at = 0
            return memoryview(self._big[-1])[self._piece_at:]
        if self._end == len(self._stage):  # (only a small frame's start is staged: move it up)
            kept = self._end - self._start
            self._stage[:kept] = self._stage[self._start:self._end]
            self._start, self._end = 0, kept
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big is not None:
            self._piece_at += nbytes
            self._big_got += nbytes
            if self._big_got == self._big_size:
                pieces, self._big = self._big, None
                self._deliver(pieces[0] if len(pieces) == 1 else b"".join(pieces))
            return
        self._end += nbytes
        self._cut()

    def _cut(self) -> None:
        """Every whole frame staged, delivered; a large one begun, moved to its own buffer."""
        while self._end - self._start >= 4 and self._closed is None:
            (size,) = _LENGTH.unpack_from(self._stage, self._start)
            if size > self.max_bytes:
                self._lost(StreamClosed(f"a frame of {size} bytes (at most {self.max_bytes})"))
                if self.transport is not None:
                    self.transport.abort()
                return
            body = self._start + 4
            have = self._end - body
            if have >= size:
                self._start = body + size
                self._deliver(bytes(self._view[body:body + size]))
                continue
            if size >= BIG_FRAME or size + 4 > len(self._stage):
                first = bytearray(min(PIECE_BYTES, size))  # (have < PIECE_BYTES: it was staged)
                first[:have] = self._view[body:self._end]
                self._big, self._big_size, self._big_got, self._piece_at = [first], size, have, have
                self._start = self._end = 0
            break
        if self._start == self._end:
            self._start = self._end = 0

    def _deliver(self, frame: bytes | bytearray) -> None:
        self._frames.append(frame)
        if len(self._frames) >= MAX_QUEUED and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def eof_received(self) -> bool:
        self._lost(StreamClosed("the connection was closed"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(StreamClosed(str(exc) if exc else "the connection was closed"))
        if not self.made.done():
            self.made.set_result(None)
        for waiter in self._drainers:
            if not waiter.done():
                waiter.set_result(None)
        self._drainers.clear()

    def _lost(self, why: StreamClosed) -> None:
        if self._closed is None:
            self._closed = why
        self._wake()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        for waiter in self._drainers:
            if not waiter.done():
                waiter.set_result(None)
        self._drainers.clear()

    # -- the session's side ----------------------------------------------------------------------

    async def read(self) -> bytes | bytearray:
        """The next frame; StreamClosed once the connection is over (after the frames it
        delivered before)."""
        while not self._frames:
            if self._closed is not None:
                raise self._closed
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frame = self._frames.popleft()
        if self._reading_paused and len(self._frames) < MAX_QUEUED // 2 and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return frame

    def writelines(self, parts: list) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(parts)

    async def drain(self) -> None:
        """Until the transport's buffer is low again (or the connection is gone)."""
        if self._closed is not None and self.transport is not None and self.transport.is_closing():
            raise self._closed
        if self._writing_paused:
            waiter = asyncio.get_running_loop().create_future()
            self._drainers.append(waiter)
            await waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# -- TLS (the same certificates as the nng plane: plane.tls) ------------------------------------

def _files(cert_pem: str, key_pem: str, cert_file: str, key_file: str) -> tuple[str, str]:
    """Files for ssl's load_cert_chain (a throwaway identity has none: written, 0600, to a
    private temporary directory)."""
    if cert_file and key_file:
        return cert_file, key_file
    folder = Path(tempfile.mkdtemp(prefix="dpip-tls-"))  # 0700
    cert, key = folder / "cert.pem", folder / "key.pem"
    cert.write_text(cert_pem)
    key.touch(0o600)
    key.write_text(key_pem)
    return str(cert), str(key)


def worker_context(tls) -> ssl.SSLContext:
    """A worker's session listener (:class:`plane.tls.WorkerTls`): its certificate shown; with a
    certificate of its own (a cluster of certificates), the server must show one of its CA's,
    as nng's listener asks."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(*_files(tls.identity.cert_pem, tls.identity.key_pem, tls.identity.cert_file,
                                tls.identity.key_file))
    if tls.has_certificate:
        ctx.load_verify_locations(cadata=tls.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(tls) -> ssl.SSLContext:
    """The server dialing a worker's session (:class:`plane.tls.ServerTls`): its own certificate
    shown; with a client CA, the worker's must be of that CA and name the worker (checked as
    the host name: see :func:`server_hostname`)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.identity.cert_file, tls.identity.key_file)
    if tls.mutual:
        ctx.load_verify_locations(cadata=tls.client_ca)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
