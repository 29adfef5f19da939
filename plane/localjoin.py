"""The join token handed to workers on the same machine, without a flag.

Every controller has a join token (given with ``--join-token``, else generated once and kept in
its data dir). Workers on other machines are given it (``DPIP_JOIN_TOKEN``); a worker on the
server's own machine started the reference's way (``--controller localhost:40899``, nothing
else) finds it here: the server writes it, at start, to a file named after its controller port
in a directory that only its user can enter (``$XDG_RUNTIME_DIR/dpip/``, else
``/tmp/dpip-<uid>/``, mode 0700, checked to be ours and no symlink). So a local process without
the user's rights has no way in, and one with them could read the data dir anyway.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
import tempfile
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 256


def runtime_dir() -> Path:
    """Where this user's controllers leave their join tokens."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "dpip"
    return Path(tempfile.gettempdir()) / f"dpip-{os.getuid()}"


def token_path(controller_port: int) -> Path:
    return runtime_dir() / f"controller-{controller_port}.join-token"


def _private_dir(path: Path, create: bool) -> bool:
    """Whether ``path`` is a real directory of ours that nobody else may enter (made so if
    ``create``). Anything else (another user's, a symlink, group- or world-open) is not used."""
    if create:
        try:
            path.mkdir(mode=0o700, parents=False)
        except FileExistsError:
            pass
        except OSError as e:
            logger.warning("cannot create %s for the local join token: %s", path, e)
            return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        logger.warning("not using %s for the local join token: it must be a directory of user %d"
                       " with mode 0700", path, os.getuid())
        return False
    return True


def publish(controller_port: int, token: str) -> Path | None:
    """Leave ``token`` for this machine's workers (replacing a stale one); the file's path, or
    None if there is no safe place (workers then need ``DPIP_JOIN_TOKEN``)."""
    directory = runtime_dir()
    if not directory.parent.is_dir() or not _private_dir(directory, create=True):
        return None
    path = token_path(controller_port)
    tmp = directory / f".{controller_port}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("cannot leave the join token for local workers in %s: %s", path, e)
        tmp.unlink(missing_ok=True)
        return None
    return path


def withdraw(controller_port: int, token: str) -> None:
    """Remove the file at a clean stop, if it still holds our token (another server may have
    taken the port since)."""
    if read(controller_port) == token:
        token_path(controller_port).unlink(missing_ok=True)


def read(controller_port: int) -> str:
    """The token a controller on this machine left for ``controller_port``, or ""."""
    directory = runtime_dir()
    if not directory.is_dir() or not _private_dir(directory, create=False):
        return ""
    try:
        fd = os.open(token_path(controller_port), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            return f.read(MAX_TOKEN_CHARS + 1).strip()[:MAX_TOKEN_CHARS]
    except OSError:
        return ""


def is_this_machine(host: str) -> bool:
    """Whether ``host`` names this machine: a loopback address or name, or an address (or the
    name of one) of its own interfaces."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    if addresses and all(a.is_loopback for a in addresses):
        return True
    own = {ipaddress.ip_address(a.address.split("%")[0]) for addrs in psutil.net_if_addrs().values()
           for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)}
    return bool(addresses) and addresses <= own
