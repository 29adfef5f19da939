"""The session stream's framing and TLS: sealed messages over one TCP connection (TLS when the
plane has it), each a 4-byte length and the message.

Why not nng for this one channel: measured on these machines, a round trip over pynng's req/rep
costs about 540 us of CPU for both ends (an nng aio, a cffi callback and a future per send and
per receive, and wake-ups from nng's own threads), over an asyncio stream 26 us. The session
carries every job and every result, so it is the one place where that matters; membership
(pub/sub heartbeats) and the welcome stay on nng.
"""

from __future__ import annotations

import asyncio
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


def write_frame(writer: asyncio.StreamWriter, parts: wire.Parts) -> None:
    """Queue one message (its pieces as they are: nothing joined here)."""
    writer.writelines([_LENGTH.pack(sum(len(p) for p in parts)), *parts])


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
