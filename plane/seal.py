"""Authenticated, fresh messages between the server and its workers.

A :class:`Channel` holds one session key (32 bytes, named by a key id) and seals what one
side sends: the inner message's JSON header, its frames (images, raw), a sequence number and a
direction label go under one Poly1305 tag, whose one-time key is keyed BLAKE2b of the session
key over the label, key id, sequence number and a nonce unique in the process (the construction
of ChaCha20-Poly1305's one-time keys: a key is never used twice, and a 2 MB frame costs 0.2 ms
to tag where HMAC-SHA256 would take 1.1 ms). The receiver checks the MAC and that the sequence number is new (a sliding
window, so concurrent requests may arrive out of order); replies are bound to their request's
sequence number. Nothing is encrypted: the worker plane's secrecy is the network's (see the
threat model in architecture.md).

Keys: ``join_key`` is derived from the join token (every controller has one), and each
welcome's session key is derived from the join key, the server's epoch, the worker's session
and the key id, so it never travels.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
from collections.abc import Iterable

from cryptography.hazmat.primitives.poly1305 import Poly1305

from plane import wire

C2W = "c2w"  # server -> worker requests (run_job, cancel_job)
W2C = "w2c"  # worker -> server publications (heartbeat, goodbye)
REPLY = "reply"  # worker -> server, the reply to a request of sequence n
JOIN = "join"  # the key id of messages sealed with the join key


class SealError(wire.DecodeError):
    """A sealed message whose MAC is wrong, whose key is unknown, or which was seen before."""


def _mac(key: bytes, *parts: object) -> str:
    return hmac.digest(key, "\n".join(str(p) for p in parts).encode("utf-8", "surrogatepass"), "sha256").hex()


def _tag(key: bytes, label: str, kid: str, seq: int, nonce: bytes, signed: Iterable[bytes | memoryview]) -> bytes:
    """The Poly1305 tag of a sealed message (see the module's docstring) over its ``signed``
    pieces."""
    one_time = hashlib.blake2b(b"dpip3 %s %s %d " % (label.encode(), kid.encode(), seq) + nonce, key=key,
                               digest_size=32).digest()
    mac = Poly1305(one_time)
    mac.update(label.encode())
    for piece in signed:
        mac.update(piece)
    return mac.finalize()


def join_key(join_token: str) -> bytes:
    """The key a join token stands for (empty: no join token)."""
    if not join_token:
        return b""
    return hmac.new(join_token.encode("utf-8", "surrogatepass"), b"dpip join key v2", hashlib.sha256).digest()


def session_key(join: bytes, epoch: str, worker_session: str, kid: str) -> bytes:
    """With a join token: the session key both sides derive (it never travels)."""
    return bytes.fromhex(_mac(join, "session", epoch, worker_session, kid))


def new_key() -> tuple[str, bytes]:
    """A fresh key id and random key."""
    return secrets.token_hex(8), secrets.token_bytes(32)


def welcome_proof(join: bytes, w: wire.Welcome) -> str:
    """The join-key MAC over every field of a welcome but the proof itself."""
    return _mac(join, "welcome", w.epoch, w.worker_session, w.kid, w.session_key, w.api_port,
                w.public_url, w.heartbeat_interval, w.max_pixels, w.max_pixel_steps)


_NONCE_PREFIX = secrets.token_bytes(8)
_nonces = itertools.count()


def _nonce() -> bytes:
    """Never the same twice in this process (a counter), unpredictable (a random prefix): no
    system call per message."""
    return _NONCE_PREFIX + next(_nonces).to_bytes(8, "big")


def seal_with(key: bytes, kid: str, label: str, seq: int, msg: wire.Message) -> wire.Parts:
    """``msg`` (its JSON header and its frames) sealed, in pieces (see :func:`plane.wire.envelope`)."""
    header, frames = wire.parts(msg)
    nonce = _nonce()
    rest, signed = wire.envelope(kid, seq, nonce, header, frames)
    return wire.sealed_parts(_tag(key, label, kid, seq, nonce, signed), rest, header, frames)


def open_with(key: bytes, sealed: wire.Sealed, label: str) -> wire.Message:
    """Check the tag and decode the inner message (which may not be sealed again)."""
    if not hmac.compare_digest(sealed.tag, _tag(key, label, sealed.kid, sealed.seq, sealed.nonce, (sealed.signed,))):
        raise SealError("bad MAC")
    return wire.decode_header(sealed.header, sealed.frames)


class ReplayWindow:
    """Which sequence numbers were seen: anything at or below ``highest - size`` is too old,
    anything seen within the window is a replay. Memory is bounded by ``size``."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.highest = 0
        self._seen: set[int] = set()

    def fresh(self, seq: int) -> bool:
        """True the first time ``seq`` is offered (and it is not too old); records it."""
        if seq <= self.highest - self.size or seq in self._seen:
            return False
        self._seen.add(seq)
        if seq > self.highest:
            self.highest = seq
            floor = seq - self.size
            if len(self._seen) > 2 * self.size:
                self._seen = {s for s in self._seen if s > floor}
        return True


class Channel:
    """One side's end of a session: seals what it sends under ``send``, opens what it receives
    under ``recv`` with a replay window, and seals/opens replies bound to a request."""

    def __init__(self, key: bytes, kid: str, send: str, recv: str) -> None:
        self.key = key
        self.kid = kid
        self.send_label = send
        self.recv_label = recv
        self._seq = 0
        self.window = ReplayWindow()

    def seal(self, msg: wire.Message) -> tuple[wire.Parts, int]:
        """The sealed pieces of ``msg`` and the sequence number they carry."""
        self._seq += 1
        return seal_with(self.key, self.kid, self.send_label, self._seq, msg), self._seq

    def open(self, sealed: wire.Sealed) -> tuple[wire.Message, bool]:
        """The inner message, and whether its sequence number is new (False: a replay)."""
        if sealed.kid != self.kid:
            raise SealError("sealed with another key")
        inner = open_with(self.key, sealed, self.recv_label)
        return inner, self.window.fresh(sealed.seq)

    def seal_reply(self, msg: wire.Message, request_seq: int) -> wire.Parts:
        return seal_with(self.key, self.kid, REPLY, request_seq, msg)

    def open_reply(self, data: bytes, request_seq: int, max_bytes: int = wire.MAX_MESSAGE_BYTES) -> wire.Message:
        """The reply to our request ``request_seq``; a plain reply (a refusal) is an error."""
        sealed = wire.decode(data, max_bytes)
        if not isinstance(sealed, wire.Sealed):
            detail = f": {sealed.error}" if isinstance(sealed, wire.Ack) else ""
            raise SealError(f"unsealed {sealed.TYPE} reply{detail}")
        if sealed.kid != self.kid or sealed.seq != request_seq:
            raise SealError("reply sealed for another request")
        return open_with(self.key, sealed, REPLY)


class WelcomeReply:
    """Seals nothing (a welcome travels plain) but opens its reply: an Ack sealed with the new
    key for request 0, which proves the worker holds the session key."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def seal(self, msg: wire.Message) -> tuple[wire.Parts, int]:
        return [wire.encode(msg)], 0

    def open_reply(self, data: bytes, request_seq: int, max_bytes: int = wire.MAX_MESSAGE_BYTES) -> wire.Message:
        return self.channel.open_reply(data, 0, max_bytes)
