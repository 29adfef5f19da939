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
from dataclasses import dataclass

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
