"""Command-line parsing shared by the server and the worker: settings dataclasses whose fields
declare their own flags (:func:`option`, :func:`add_options`), and every flag has a DPIP_*
variable."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

#: The reference's ports: the HTTP API and the controller.
API_PORT = 8080
CONTROLLER_PORT = 40899


def parse_range(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` -> (MIN, MAX), with 0 <= MIN <= MAX and MAX >= 1."""
    lo, sep, hi = text.partition(":")
    try:
        low, high = int(lo), int(hi)
    except ValueError:
        raise ValueError(f"--autoscale takes MIN:MAX, like 0:4 (got {text!r})") from None
    if not sep or low < 0 or high < 1 or low > high:
        raise ValueError(f"--autoscale takes MIN:MAX with 0 <= MIN <= MAX and MAX >= 1 (got {text!r})")
    return low, high


def option(default: Any, help: str | None, *, flag: str | None = None,
           parse: Callable[[str], Any] | None = None, metavar: str | None = None,
           choices: tuple[str, ...] | None = None) -> Any:
    """A settings field with its command-line flag (``help=None``: no flag)."""
    meta = {"help": help, "flag": flag, "parse": parse, "metavar": metavar, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


def add_options(p: argparse.ArgumentParser, settings: type) -> list[dataclasses.Field]:
    """A flag (and its ``DPIP_*`` variable) for each field of the ``settings`` dataclass that
    has help; those fields, whose values ``parse_args`` then gives under their own names."""
    fields = [f for f in dataclasses.fields(settings) if f.metadata.get("help") is not None]
    for f in fields:
        _add_option(p, f)
    return fields


def _add_option(p: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    if isinstance(default, bool):
        action = "store_false" if default else "store_true"
        p.add_argument(flag, dest=f.name, action=action, default=default, help=meta["help"])
        return
    parse = meta["parse"]
    kind = _checked(parse) if parse else type(default)
    env = "DPIP_" + flag[2:].upper().replace("-", "_")  # the flag's name, e.g. DPIP_TRUSTED_PROXY
    p.add_argument(flag, dest=f.name, type=kind, default=default, help=meta["help"],
                   metavar=meta["metavar"], choices=meta["choices"], env=env)


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse shows an ArgumentTypeError's own words (a plain ValueError it hides)."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


class EnvDefaultsParser(argparse.ArgumentParser):
    """An ArgumentParser whose options default to ``DPIP_<DEST>`` from the environment.

    ``--controller-port`` reads ``DPIP_CONTROLLER_PORT``; a flag on the command line wins.
    """

    def add_argument(self, *args, env: str | None = None, **kwargs):  # type: ignore[override]
        """``env`` names the variable when it is not ``DPIP_<DEST>``."""
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and action.dest != "help":
            env = env or "DPIP_" + action.dest.upper()
            action.help = f"{action.help or ''} [env {env}]".strip()
            raw = os.environ.get(env)
            if raw is not None and raw != "":
                if action.type is not None:
                    try:
                        action.default = action.type(raw)  # type: ignore[operator]
                    except (ValueError, argparse.ArgumentTypeError) as e:
                        self.error(f"{env}: {e}")
                elif isinstance(action.default, bool) or action.nargs == 0:
                    action.default = raw.lower() in ("1", "true", "yes", "on")
                else:
                    action.default = raw
        return action


def setup_logging(level: str = "INFO") -> None:
    """One log format for every DPIP process."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # nng logs every failed redial as an ERROR; one line per second per peer is noise.
    logging.getLogger("pynng").setLevel(logging.CRITICAL)
    logging.getLogger("aiosqlite").setLevel(logging.INFO)  # logs every statement at DEBUG


def split_host_port(value: str, default_host: str, default_port: int) -> tuple[str, int]:
    """Parse ``host:port``, ``:port``, ``host`` or ``[v6]:port``; fill in what is missing."""
    value = value.strip()
    value = value.removeprefix("tls+tcp://").removeprefix("tcp://")  # TLS is the --tls-* flags' business
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":")
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, ""
    return (host or default_host), (int(port) if port else default_port)


def local_address_towards(host: str, port: int) -> str:
    """The local IP this machine uses to reach ``host`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def secrets_in_flags(argv: list[str], flags: dict[str, str]) -> list[str]:
    """Warnings for the ``flags`` (flag -> its variable) given on the command line with a
    secret: every local user can read a process's command line (``ps``, /proc/PID/cmdline)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return [f"{flag} on the command line is visible to every user of this machine (ps, /proc/PID/cmdline):"
            f" set {variable} instead" for flag, variable in flags.items() if flag in given]
