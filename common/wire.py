"""The one module that defines what travels over nng between controller, scheduler and workers.

Every message is a frozen dataclass with a ``TYPE`` tag; on the wire it is a JSON object
``{"type": ..., "v": VERSION, ...fields}``. :func:`decode` validates the tag, the version and
every field's type, and raises :class:`DecodeError` for anything else, so a socket loop can
log, count and drop garbage without ever crashing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

VERSION = 1

#: Upper bound for any message on our sockets; larger ones are dropped by nng itself.
MAX_MESSAGE_BYTES = 256 * 1024


class DecodeError(ValueError):
    """Bytes that are not a valid message of this protocol version."""


@dataclass(frozen=True)
class Gpu:
    """GPU telemetry as NVML reports it; ``count == 0`` means no GPU."""

    count: int = 0
    utilization_percent: float = 0.0
    memory_percent: float = 0.0


@dataclass(frozen=True)
class Heartbeat:
    """Worker -> controller (pub/sub), at least once a second: who I am and how loaded I am."""

    TYPE = "heartbeat"
    name: str
    session: str  # random per worker process; a new session means the worker restarted
    rpc_address: str  # tcp://host:port the scheduler dials
    tags: list[str]
    cpu_percent: float
    memory_percent: float
    gpu: Gpu
    running_jobs: int
    capacity: int
    jobs_done: int
    welcomed_by: str = ""  # the controller epoch that last welcomed this worker
    draining: bool = False
    running_job_ids: list[int] = field(default_factory=list)
    join_proof: str = ""  # HMAC of (name, session, rpc_address) with the join token, if any


def join_proof(join_token: str, *parts: object) -> str:
    """Proof of knowing the join token, bound to ``parts``: a heartbeat's (name, session, RPC
    address), so a replayed one can only point the controller at the real worker; a welcome's
    (epoch, api_port, public_url, token), so nobody else can redirect a worker."""
    if not join_token:
        return ""
    text = "\n".join(str(p) for p in parts).encode()
    return hmac.new(join_token.encode(), text, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Goodbye:
    """Worker -> controller (pub/sub): I am leaving; my jobs are finished or abandoned."""

    TYPE = "goodbye"
    name: str
    session: str


@dataclass(frozen=True)
class Welcome:
    """Controller -> worker (req/rep): where the API is and the worker's token."""

    TYPE = "welcome"
    epoch: str
    api_port: int
    public_url: str
    token: str
    heartbeat_interval: float
    proof: str = ""  # join_proof(join token, epoch, api_port, public_url, token), if any


@dataclass(frozen=True)
class RunJob:
    """Scheduler -> worker (req/rep): filter one image; the reply comes when it is stored."""

    TYPE = "run_job"
    job_id: int
    workload_id: str
    image_id: int
    filter: str
    attempt: int
    params: dict[str, Any] = field(default_factory=dict)
    tied_peer: str = ""  # tied request: the other copy's worker RPC address, to cancel on start


@dataclass(frozen=True)
class CancelJob:
    """Scheduler -> worker (req/rep): stop a job if it is still running."""

    TYPE = "cancel_job"
    job_id: int
    if_not_started: bool = False  # from a tied peer: only a copy still waiting is cancelled


@dataclass(frozen=True)
class JobResult:
    """Worker -> scheduler, the reply to :class:`RunJob`."""

    TYPE = "job_result"
    job_id: int
    ok: bool
    error: str = ""
    retryable: bool = True
    worker: str = ""
    download_ms: float = 0.0
    process_ms: float = 0.0
    upload_ms: float = 0.0
    started: bool = False  # this copy did (some of) the work: for counting extra work


@dataclass(frozen=True)
class Ack:
    """Generic reply: the request was taken (``ok``) or refused with ``error``."""

    TYPE = "ack"
    ok: bool = True
    error: str = ""


Message = Heartbeat | Goodbye | Welcome | RunJob | CancelJob | JobResult | Ack
MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls for cls in (Heartbeat, Goodbye, Welcome, RunJob, CancelJob, JobResult, Ack)
}


def encode(msg: Message) -> bytes:
    """Serialise a message to UTF-8 JSON bytes with its type tag and the protocol version."""
    body = dataclasses.asdict(msg)
    body["type"] = msg.TYPE
    body["v"] = VERSION
    return json.dumps(body, separators=(",", ":")).encode()


def decode(data: bytes) -> Message:
    """Parse bytes into a message, or raise :class:`DecodeError` saying what is wrong."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DecodeError(f"not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise DecodeError("not a JSON object")
    if obj.get("v") != VERSION:
        raise DecodeError(f"unsupported version {obj.get('v')!r} (speak {VERSION})")
    cls = MESSAGE_TYPES.get(obj.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise DecodeError(f"unknown message type {obj.get('type')!r}")
    return _build(cls, obj, cls.TYPE)


@functools.cache
def _fields(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """Each field of a message class with its resolved type (resolving is slow: cache it)."""
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


def _build(cls: type, obj: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``obj``, checking every field; unknown keys are ignored."""
    kwargs = {}
    for f, hint in _fields(cls):
        if f.name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise DecodeError(f"{where}: missing field {f.name!r}")
            continue
        kwargs[f.name] = _check(hint, obj[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


def _check(hint: Any, value: Any, where: str) -> Any:
    """Validate ``value`` against a (simple) type hint; return it, converted where needed."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise DecodeError(f"{where}: expected an object")
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise DecodeError(f"{where}: expected a list")
        return [_check(item, v, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise DecodeError(f"{where}: expected an object")
        return value
    if origin in (typing.Union, types.UnionType):
        raise DecodeError(f"{where}: unions are not used on the wire")
    if hint is bool:
        if not isinstance(value, bool):
            raise DecodeError(f"{where}: expected a boolean")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DecodeError(f"{where}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DecodeError(f"{where}: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise DecodeError(f"{where}: expected a string")
        return value
    return value

