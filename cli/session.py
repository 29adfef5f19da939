"""Where ``dpip login`` keeps the server address and the token: one JSON file, mode 0600.

``$DPIP_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/dpip``, else ``~/.config/dpip``. ``$DPIP_URL`` and
``$DPIP_TOKEN`` override the file, for scripts and CI jobs that never log in interactively.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from common.config import API_PORT

DEFAULT_URL = f"http://localhost:{API_PORT}"


class CliError(Exception):
    """A failure to report on one line, with the exit code scripts can test."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


#: Exit codes (also in user-guide.md).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


@dataclass
class Session:
    url: str = DEFAULT_URL
    user: str = ""
    token: str = ""


def config_dir() -> Path:
    if explicit := os.environ.get("DPIP_CONFIG_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "dpip"


def config_path() -> Path:
    return config_dir() / "config.json"


def load() -> Session:
    """The saved session (or an empty one), with the environment's overrides applied."""
    session = load_saved()
    if url := os.environ.get("DPIP_URL"):
        session = at_url(session, url)
    session.token = os.environ.get("DPIP_TOKEN") or session.token
    return session


def at_url(session: Session, url: str) -> Session:
    """The session pointed at ``url``: the saved token only goes to the server that issued it."""
    same = url.rstrip("/") == session.url.rstrip("/")
    return Session(url, session.user, session.token if same else "")


def load_saved() -> Session:
    session = Session()
    path = config_path()
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        saved = {}
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read {path}: {e}; run `dpip login` again") from e
    if isinstance(saved, dict):
        session = Session(**{k: str(v) for k, v in saved.items() if k in Session.__dataclass_fields__})
    return session


def save(session: Session) -> Path:
    """Write the session so that only its owner can read it (the token is a credential)."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(session), f, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def forget() -> None:
    """Drop the token but keep the address and user for the next login."""
    session = load_saved()
    if config_path().exists():
        save(Session(session.url, session.user, ""))
