"""Job capabilities: the only HTTP credential a worker ever holds.

Each :class:`~plane.wire.RunJob` carries one, good for exactly that job: read its original,
store its result, until the attempt's deadline, and only while the worker it was issued to is
alive with the same session key under the same server epoch (membership checks that part).
So a process that joins as a worker can read only the images of jobs it was sent, and its
credentials die with its session.

Format: ``job.<base64url JSON claims>.<hex HMAC-SHA256>``, keyed by a key derived from the
server's JWT secret (so tokens from users and from jobs can never be confused).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.models import Unauthorized

PREFIX = "job."


@dataclass(frozen=True)
class JobClaims:
    """What a capability allows: one image of one workload, for one worker's session."""

    job_id: int
    workload_id: str
    image_id: int
    filter: str
    worker: str
    kid: str  # the worker's session key id when it was issued
    epoch: str  # the server's epoch when it was issued
    expires_at: float


def derive_key(secret: bytes) -> bytes:
    return hmac.new(secret, b"dpip job capability v1", hashlib.sha256).digest()


def issue(key: bytes, claims: JobClaims) -> str:
    body = base64.urlsafe_b64encode(json.dumps(vars(claims), separators=(",", ":")).encode()).decode()
    return f"{PREFIX}{body}.{hmac.digest(key, body.encode(), 'sha256').hex()}"


def is_capability(token: str) -> bool:
    return token.startswith(PREFIX)


def verify(key: bytes, token: str, now: float | None = None) -> JobClaims:
    """The claims of a genuine, unexpired capability; :class:`Unauthorized` otherwise."""
    body, _, mac = token[len(PREFIX):].partition(".")
    expected = hmac.digest(key, body.encode("utf-8", "surrogatepass"), "sha256").hex()
    if not hmac.compare_digest(mac.encode("utf-8", "surrogatepass"), expected.encode()):
        raise Unauthorized("invalid job capability")
    try:
        claims = JobClaims(**json.loads(base64.urlsafe_b64decode(body)))
    except (ValueError, TypeError, binascii.Error) as e:
        raise Unauthorized("invalid job capability") from e
    if claims.expires_at < (time.time() if now is None else now):
        raise Unauthorized("job capability expired")
    return claims


class Capabilities:
    """Issues and checks the capabilities of one controller's epoch; a capability is good only
    while its worker is alive on the session it was issued to (``workers``: membership's, live)."""

    def __init__(self, secret: bytes, epoch: str, workers: Mapping[str, Any]) -> None:
        self._key = derive_key(secret)
        self.epoch = epoch
        self.workers = workers

    def issue(self, name: str, job_id: int, workload_id: str, image_id: int, filter_: str, deadline: float) -> str:
        """An HTTP credential for this one job on worker ``name``'s current session."""
        info = self.workers.get(name)
        kid = info.channel.kid if info is not None and info.channel is not None else ""
        return issue(self._key, JobClaims(job_id, workload_id, image_id, filter_, name, kid, self.epoch, deadline))

    def check(self, token: str) -> JobClaims:
        """A capability's claims, if it is genuine, unexpired, of this epoch, and its worker is
        still alive on the session it was issued to."""
        claims = verify(self._key, token)
        info = self.workers.get(claims.worker)
        if (claims.epoch != self.epoch or info is None or not info.alive or info.channel is None
                or info.channel.kid != claims.kid):
            raise Unauthorized("job capability no longer valid: its worker's session ended")
        return claims
