"""A worker's end of the worker plane: its session, the key of the welcome it accepted, sealing
what it publishes and opening what it is sent. No sockets here: :mod:`worker.service` (and the
tests' impersonated workers) move the bytes.

Trust rule: a worker obeys only the server that welcomed it. A welcome must name the worker's
own session (a random id only the worker and the servers it heartbeats to have seen) and carry
the join key's proof (a worker without the join token takes no welcome: a session key sent in
clear could come from anyone); every later request must be sealed with the session key that
welcome set up, with a sequence number not seen before.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pynng

from plane import wire
from worker.outbox import Outbox
from plane.seal import (
    C2W,
    JOIN,
    W2C,
    Channel,
    SealError,
    join_key,
    seal_with,
    session_key,
    welcome_proof,
)


class Refused(Exception):
    """A message this worker will not act on; the text says why (it goes back to the sender)."""


#: How often, at most, a worker looks again for the join token its machine's server left.
TOKEN_RECHECK = 1.0


class WorkerLink:
    """The worker plane's state of one worker process. ``join_token`` is the controller's join
    token, or a function that finds it (the one a server on this machine left, looked for
    again, at most every second, while no welcome has come)."""

    def __init__(self, name: str, join_token: str | Callable[[], str] = "",
                 offers: list[wire.FilterDeclaration] | None = None) -> None:
        self.name = name
        # the welcome's answer (its session port is set once the worker listens)
        self.joined = wire.Joined(list(offers or []), declares=offers is not None)
        self.session = secrets.token_hex(16)
        self._find_token = join_token if callable(join_token) else None
        self._token = join_token if isinstance(join_token, str) else ""
        self._looked = -TOKEN_RECHECK
        self.join = join_key(self._token)
        self.channel: Channel | None = None
        self.epoch = ""
        self._old_kids: deque[str] = deque(maxlen=64)  # welcomes already used: never again
        self._hello_seq = 0

    @property
    def kid(self) -> str:
        return self.channel.kid if self.channel is not None else ""

    def _refresh_token(self) -> None:
        now = time.monotonic()
        if self._find_token is None or self.channel is not None or now - self._looked < TOKEN_RECHECK:
            return
        self._looked = now
        token = self._find_token()
        if token != self._token:
            self._token, self.join = token, join_key(token)

    def hello(self, rpc_address: str) -> bytes:
        """Here I am (sealed with the join key if there is one)."""
        self._refresh_token()
        msg = wire.Hello(self.name, self.session, rpc_address, self.kid)
        if not self.join:
            return wire.encode(msg)
        self._hello_seq += 1
        return wire.join(seal_with(self.join, JOIN, W2C, self._hello_seq, msg))

    def publish(self, msg: wire.Heartbeat | wire.Goodbye) -> bytes | None:
        """``msg`` sealed with the session key; None until welcomed."""
        if self.channel is None:
            return None
        return wire.join(self.channel.seal(msg)[0])

    def accept_welcome(self, w: wire.Welcome) -> wire.Parts:
        """Take a welcome's session key; return the sealed acknowledgement, or raise Refused."""
        if w.worker_session != self.session:
            raise Refused("welcome refused: it is not for this worker's session")
        if self.channel is not None and w.kid == self.channel.kid:
            return self.channel.seal_reply(self.joined, 0)  # our answer was lost: say it again
        if w.kid in self._old_kids or not w.kid:
            raise Refused("welcome refused: its key was used before")
        if not self.join:  # a key sent in clear could have been sent by anyone who saw our hello
            raise Refused("welcome refused: this worker has no join token (DPIP_JOIN_TOKEN)")
        if not hmac.compare_digest(w.proof, welcome_proof(self.join, w)):
            raise Refused("welcome refused: wrong join token proof")
        key = session_key(self.join, w.epoch, w.worker_session, w.kid)
        if self.channel is not None:
            self._old_kids.append(self.channel.kid)
        self.channel = Channel(key, w.kid, send=W2C, recv=C2W)
        self.epoch = w.epoch
        return self.channel.seal_reply(self.joined, 0)

    def open(self, sealed: wire.Sealed) -> tuple[wire.Message, bool, Channel]:
        """A request from the server that welcomed us: (message, fresh, channel to reply on)."""
        channel = self.channel
        if channel is None or sealed.kid != channel.kid:
            raise Refused("refused: not from the server that welcomed this worker")
        try:
            inner, fresh = channel.open(sealed)
        except SealError as e:
            raise Refused(f"refused: {e}") from None
        except wire.DecodeError:
            raise Refused("refused: bad sealed message") from None
        return inner, fresh, channel


@dataclass
class ControllerLink:
    """One controller we heartbeat to: its own session and key (:class:`WorkerLink`), its
    socket, and the API its welcome named. A job comes from the one whose key sealed it."""

    host: str
    port: int
    link: WorkerLink
    pub: pynng.Pub0 | None = None
    api_url: str = ""
    heartbeat_interval: float = 1.0
    outbox: Outbox = field(default_factory=Outbox)  # its session's results, until collected

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def welcomed(self) -> bool:
        return self.link.channel is not None
