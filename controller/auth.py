"""Users, password hashes and JWTs: who may do what.

Passwords are stored as scrypt hashes. Tokens are HS256 JWTs signed with a secret generated on
first start and kept in the data dir (0600); each has a ``scope`` (``user`` or ``worker``), an
expiry, and a ``jti`` that logout revokes, persistently. A user token is good only while its user
exists, and only if issued after that account was created: a removed user's token does not come
back to life when someone adds the same name again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt

from common.models import Forbidden, Unauthorized, quoted
from storage.datastore import Datastore

logger = logging.getLogger(__name__)

USER = "user"
WORKER = "worker"  # the scope of earlier versions' worker tokens: refused everywhere (403), never issued
JOB = "job"  # a worker's capability for one job (controller.capability), not a JWT
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
#: How often, at most, users and revocations are re-read when another process changed them.
REFRESH_INTERVAL = 0.5


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash``, both base64."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split("$")
        got = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), dklen=32, n=int(n), r=int(r), p=int(p)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def write_private(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only (0600), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def load_or_create_secret(path: Path) -> bytes:
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    secret = secrets.token_bytes(32)
    write_private(path, secret.hex())
    return secret


def load_join_token(data_dir: Path, required: bool) -> str:
    """The join token kept in the data dir; made, saved (0600) and printed if required and new."""
    path = data_dir / "join-token"
    if path.exists():
        return path.read_text().strip()
    if not required:
        return ""
    return _announce_join_token(path, secrets.token_urlsafe(24))


def _announce_join_token(path: Path, token: str) -> str:
    write_private(path, token + "\n")
    print(f"DPIP join token for workers on other machines (set DPIP_JOIN_TOKEN on each; workers on"
          f" this machine find it by themselves): {token} (saved in {path})", flush=True)
    return token


async def system_secret(store: Datastore, data_dir: Path) -> bytes:
    """The key that signs tokens and capabilities: the data dir's, or, when servers share the
    datastore, the datastore's (made by the first server), so a token from one works on all."""
    if not store.shared:
        return load_or_create_secret(data_dir / "jwt-secret")
    return bytes.fromhex(await store.setting("jwt_secret", secrets.token_bytes(32).hex()))


async def system_join_token(store: Datastore, data_dir: Path, given: str, required: bool) -> str:
    """The join token in force: the one given, else the data dir's; when servers share the
    datastore, the datastore's (the first server that needs one makes it, and every server
    keeps a copy in its data dir for operators)."""
    if given or not store.shared:
        return given or load_join_token(data_dir, required)
    token = await store.get_setting("join_token")
    if token is None and not required:
        return ""
    path = data_dir / "join-token"
    if token is None:
        token = await store.setting("join_token", secrets.token_urlsafe(24))
        return _announce_join_token(path, token)
    if not path.exists() or path.read_text().strip() != token:
        write_private(path, token + "\n")
    return token


@dataclass(frozen=True)
class Claims:
    subject: str
    scope: str
    jti: str
    expires_at: float
    issued_ms: int = 0  # when it was issued, in ms since the epoch (rounded down)


class Auth:
    """Logs users in, issues and checks tokens, revokes them."""

    def __init__(self, store: Datastore, secret: bytes, token_ttl: float) -> None:
        self.store = store
        self.secret = secret
        self.token_ttl = token_ttl
        self._revoked: set[str] = set()
        self._verified: dict[str, Claims] = {}  # token -> claims whose signature checked out
        self._users: dict[str, float] = {}  # name -> created_at: tokens from before are not theirs
        self._data_version: int | None = None
        self._next_refresh = 0.0

    async def load(self) -> None:
        """Read users and revoked tokens (the version first: a change meanwhile is seen later)."""
        self._data_version = await self.store.data_version()
        self._revoked |= await self.store.revoked_tokens()  # never drop one revoked in memory
        self._users = dict(await self.store.list_users())

    async def refresh_users(self) -> None:
        """Re-read users and revocations if another process changed the datastore (``main.py
        users remove`` while the server runs): at most every REFRESH_INTERVAL seconds, and then
        only a ``PRAGMA data_version`` unless something changed. Called before each request."""
        now = time.monotonic()
        if now < self._next_refresh:
            return
        self._next_refresh = now + REFRESH_INTERVAL
        if await self.store.data_version() != self._data_version:
            await self.load()

    async def bootstrap_admin(self, data_dir: Path, user: str, password: str | None) -> None:
        """First start: create the admin user; a generated password is printed once and saved."""
        if await self.store.count_users() > 0:
            return
        if not password:
            password = secrets.token_urlsafe(12)
            path = data_dir / "admin-password"
            write_private(path, password + "\n")
            print(f"DPIP admin user {user!r} created with password {password} (saved in {path})", flush=True)
        await self.add_user(user, password)
        logger.info("created admin user %r", user)

    async def add_user(self, name: str, password: str) -> None:
        self._users[name] = await self.store.add_user(name, await asyncio.to_thread(hash_password, password))

    async def login(self, name: str, password: str) -> str:
        user = await self.store.user(name)
        # Hash even for unknown users so timing does not tell which names exist.
        ok = await asyncio.to_thread(verify_password, password, user[0] if user else _DUMMY_HASH)
        if user is None or not ok:
            raise Unauthorized("wrong user name or password")
        self._users[name] = user[1]  # added by `main.py users add` while we run
        return self.issue(name, USER)

    def issue(self, subject: str, scope: str, ttl: float | None = None) -> str:
        now = time.time()
        claims = {
            "sub": subject,
            "scope": scope,
            "jti": uuid.uuid4().hex,
            "iat": int(now),
            "iat_ms": int(now * 1000),  # iat is whole seconds: too coarse to compare with created_at
            "exp": int(now + (ttl or self.token_ttl)),
        }
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def verify(self, token: str, scopes: tuple[str, ...]) -> Claims:
        """Check signature, expiry, revocation and scope; raise Unauthorized / Forbidden."""
        claims = self._verified.get(token)
        if claims is None or claims.expires_at < time.time():
            claims = self._decode(token)
            if len(self._verified) >= 4096:
                self._verified.clear()  # a crude bound; re-verifying is only a little slower
            self._verified[token] = claims
        if claims.jti in self._revoked:
            raise Unauthorized("token revoked (logged out): log in again")
        if claims.scope == USER:
            created_at = self._users.get(claims.subject)
            if created_at is None:
                raise Unauthorized(f"user {quoted(claims.subject)} no longer exists")
            if claims.issued_ms < int(created_at * 1000):
                raise Unauthorized("token of an earlier account of the same name: log in again")
        if claims.scope not in scopes:
            raise Forbidden(f"a {claims.scope or 'unscoped'} token cannot do this")
        return claims

    def _decode(self, token: str) -> Claims:
        """Signature and expiry, via PyJWT (a few hundred microseconds: hence the cache)."""
        try:
            raw = jwt.decode(
                token, self.secret, algorithms=["HS256"], options={"require": ["exp", "sub", "jti"]}
            )
        except jwt.ExpiredSignatureError as e:
            raise Unauthorized("token expired: log in again") from e
        except jwt.InvalidSignatureError as e:
            raise Unauthorized("invalid token: not signed by this system (log in again)") from e
        except jwt.InvalidTokenError as e:
            raise Unauthorized("invalid token: not a token this system issued (log in again)") from e
        # Tokens from before iat_ms existed count as issued at the end of their second.
        issued_ms = raw.get("iat_ms", int(raw.get("iat", 0)) * 1000 + 999)
        return Claims(str(raw["sub"]), str(raw.get("scope", "")), str(raw["jti"]), float(raw["exp"]),
                      int(issued_ms))

    async def revoke(self, claims: Claims) -> None:
        self._revoked.add(claims.jti)
        await self.store.revoke_token(claims.jti, claims.expires_at)


_DUMMY_HASH = hash_password(secrets.token_hex(8))
