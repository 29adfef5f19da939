"""A worker's settings: its flags (``worker/cli.py`` parses those made of several fields) and
``DPIP_*`` variables, and where it finds the join token."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from common.config import option
from imaging.codec import EncodeOptions
from plane import localjoin


@dataclass(frozen=True)
class WorkerSettings:
    """A worker's settings; the fields with help are its flags (``worker/cli.py`` adds those
    that are parsed into several fields: the controllers, the name, the tags, the encoding)."""

    controller_host: str
    controller_port: int
    name: str
    #: every controller to heartbeat to (several servers of one system); the first by default
    controllers: tuple[tuple[str, int], ...] = ()
    tags: tuple[str, ...] = ()
    capacity: int = option(os.cpu_count() or 1, "jobs run at once (default: number of cores)")
    prefetch: int = option(-1, "jobs it takes beyond --capacity, waiting for a slot, so that the next job"
                               " starts as one ends (default: a quarter of --capacity, at least 1; 0: none)")
    advertise_host: str = option("", "address the server dials for RPC (default: our address towards the"
                                     " controller)")
    rpc_bind: str = option("", "address to listen on for RPC (default: the advertised one)")
    rpc_port: int = option(0, "RPC port (default: any free port)")
    session_port: int = option(0, "port of the session stream the server connects to for jobs and results"
                                  " (default: any free port)")
    image_store_endpoint: str = option("", "API URL, overriding what the controller says (for images too large"
                                           " to travel with their jobs)")
    image_store_token: str = option("", "API token, overriding what the controller sends (every image then goes"
                                        " through the API with it, none with its job)")
    heartbeat_interval: float = option(1.0, "seconds between heartbeats until the controller sets it")
    encode: EncodeOptions = EncodeOptions()
    http_timeout: float = 60.0
    drain_timeout: float = 60.0
    # Fault knobs for operators and tests (off by default):
    slow_rate: float = option(0.0, "fault knob: share of jobs made slow (0-1)")
    slow_ms: float = option(0.0, "fault knob: how much slower, in ms")
    fail_rate: float = option(0.0, "fault knob: share of jobs dropped without any reply (0-1)")
    join_token: str = option("", "the controller's join token, if this worker does not find it by itself"
                                 " (better: the env variable)")
    tls_ca: str = option("", "PEM CA the server's certificate must come from: the controller is dialed over"
                             " tls+tcp:// and the API over https:// (with --tls-cert, default: the"
                             " system's CAs)", metavar="PEM")
    tls_cert: str = option("", "this worker's PEM certificate (main.py certs worker DIR NAME): it proves the"
                               " worker's name to a server with --tls-client-ca, and its RPC serves TLS"
                               " with it", metavar="PEM")
    tls_key: str = option("", "PEM private key of --tls-cert", metavar="PEM")
    exit_with_parent: bool = option(False, "drain and exit when the process that started us ends (the"
                                           " server's autoscaler uses it)")


def prefetch_of(settings: WorkerSettings) -> int:
    """The jobs a worker takes beyond its capacity (``--prefetch``; by default a quarter of its
    slots, at least one)."""
    return max(1, settings.capacity // 4) if settings.prefetch < 0 else settings.prefetch


def join_token_for(settings: WorkerSettings, host: str, port: int) -> str | Callable[[], str]:
    """The join token for the controller at ``host:port``: the one given (``--join-token``,
    ``DPIP_JOIN_TOKEN``), else, for a controller on this machine, the one its server left for
    local workers (:mod:`plane.localjoin`), else none (a remote server will refuse us)."""
    if settings.join_token:
        return settings.join_token
    if localjoin.is_this_machine(host):
        return lambda: localjoin.read(port)
    return ""
