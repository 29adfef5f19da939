"""The one module that defines what travels over nng between controller, scheduler and workers.

Every message is a frozen dataclass with a ``TYPE`` tag; on the wire it is a JSON object
``{"type": ..., "v": VERSION, ...fields}``. :func:`decode` is the only way bytes become a
message, and whatever the bytes (huge integers, deep nesting, NaN, non-ASCII, wrong types,
long strings), it either returns a message whose every field is within its declared bounds or
raises :class:`DecodeError`. Socket loops can therefore log, count and drop garbage and go on.

Authentication is an envelope, :class:`Sealed` (see :mod:`plane.seal`): a MAC over the exact
bytes of an inner message, with a key id and a sequence number for freshness.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from plane.fields import (  # noqa: F401  (bounds the messages and their users name)
    HEX_RE,
    MAX_INT,
    MAX_LIST,
    MAX_TAGS,
    MAX_TEXT,
    NAME_RE,
    URL_RE,
    _bounds,
    hex_field,
    name_field,
    number,
    percent,
    text,
)

VERSION = 2

#: Images up to this size travel inside ``run_job`` and its reply (base64) instead of over HTTP.
INLINE_MAX_BYTES = 256 * 1024
#: Upper bound for any message on our sockets (an inline image, base64, and the envelope fit);
#: larger ones are dropped by nng itself.
MAX_MESSAGE_BYTES = 512 * 1024
#: base64 of INLINE_MAX_BYTES bytes
MAX_INLINE_TEXT = 4 * ((INLINE_MAX_BYTES + 2) // 3)
class DecodeError(ValueError):
    """Bytes that are not a valid message of this protocol version."""


# -- messages ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gpu:
    """GPU telemetry as NVML reports it; ``count == 0`` means no GPU."""

    count: int = number(0, hi=64)
    utilization_percent: float = percent()
    memory_percent: float = percent()


@dataclass(frozen=True)
class Hello:
    """Worker -> controller (pub/sub), until welcomed and then once an interval: here I am,
    call me at ``rpc_address``. Sealed with the join key when there is a join token. It only
    ever causes a :class:`Welcome` to that address, which the worker accepts only if it names
    the worker's own ``session``."""

    TYPE = "hello"
    name: str = name_field()
    session: str = hex_field()  # random per worker process; never shown to users
    rpc_address: str = _bounds(pattern=re.compile(r"(tls\+)?tcp://[^\s]{1,250}"))
    welcomed_by: str = hex_field("")  # key id of the welcome it holds ("" if none)


@dataclass(frozen=True)
class Heartbeat:
    """Worker -> controller (pub/sub, sealed with the session key), at least once a second."""

    TYPE = "heartbeat"
    name: str = name_field()
    session: str = hex_field()
    tags: list[str] = _bounds(factory=list, max_items=MAX_TAGS, pattern=NAME_RE)
    cpu_percent: float = percent()
    memory_percent: float = percent()
    gpu: Gpu = field(default_factory=Gpu)
    running_jobs: int = number(0, hi=100_000)
    capacity: int = number(0, hi=4096)
    jobs_done: int = number(0)
    draining: bool = False
    running_job_ids: list[int] = _bounds(factory=list, max_items=MAX_LIST, lo=0, hi=MAX_INT)


@dataclass(frozen=True)
class Goodbye:
    """Worker -> controller (pub/sub, sealed): I am leaving; my jobs are finished or abandoned."""

    TYPE = "goodbye"
    name: str = name_field()
    session: str = hex_field()


@dataclass(frozen=True)
class Welcome:
    """Controller -> worker (req/rep, the one unsealed request): the new session's key id, where
    the API is and the server's limits, with ``proof``, a MAC with the join key. The session key
    is derived from the join token on both sides and never sent: ``session_key`` is always empty
    (a worker ignores what it holds and derives its own)."""

    TYPE = "welcome"
    epoch: str = hex_field()
    worker_session: str = hex_field()  # the session of the worker being welcomed
    kid: str = hex_field()  # names the new session key in later sealed messages
    session_key: str = hex_field("")
    api_port: int = number(0, hi=65535)
    public_url: str = text("", max_len=512)
    heartbeat_interval: float = number(1.0, lo=0.05, hi=60.0)
    max_pixels: int = number(0)  # the server's --max-pixels (0: the worker keeps its own)
    max_pixel_steps: int = number(0)  # a job's budget of pixel-steps (0: the default multiple)
    proof: str = hex_field("")


@dataclass(frozen=True)
class ParamDeclaration:
    """A filter parameter as a worker declares it (see filtering.registry.Param)."""

    name: str = name_field()
    type: str = _bounds(pattern=re.compile(r"integer|number|string"))
    default: str = text("", max_len=32)  # as text; "" if it has none
    minimum: float = number(0.0, lo=-MAX_INT)
    maximum: float = number(0.0, lo=-MAX_INT)
    choices: list[str] = _bounds(factory=list, max_items=16, pattern=NAME_RE)
    help: str = text("", max_len=200)


@dataclass(frozen=True)
class FilterDeclaration:
    """A filter a worker can run, declared as the registry declares it."""

    name: str = name_field()
    version: str = text("", max_len=64)
    help: str = text("", max_len=200)
    params: list[ParamDeclaration] = _bounds(factory=list, max_items=16)
    colour: str = _bounds("keeps", pattern=re.compile(r"keeps|gray|any"))
    size: str = _bounds("same", pattern=re.compile(r"same|changes"))
    output_format: bool = False
    gpu: bool = False  # it runs on this worker's GPU


#: Filters a worker may offer at most.
MAX_FILTERS = 128


@dataclass(frozen=True)
class Joined:
    """Worker -> controller, the (sealed) reply to :class:`Welcome`: taken, and the filters this
    worker runs (a worker that answers a plain :class:`Ack` runs the server's built-ins)."""

    TYPE = "joined"
    filters: list[FilterDeclaration] = _bounds(factory=list, max_items=MAX_FILTERS)


@dataclass(frozen=True)
class RunJob:
    """Scheduler -> worker (req/rep, sealed): filter one image; the reply comes once it is stored.
    ``capability`` is the HTTP credential for exactly this job: read its original, write its
    result, until its deadline."""

    TYPE = "run_job"
    job_id: int = number()
    workload_id: str = text()
    image_id: int = number()
    filter: str = _bounds(max_len=1024, pattern=re.compile(r"[A-Za-z0-9_.,=()|+ -]{1,1024}"))  # or a pipeline
    attempt: int = number(0, hi=1000)
    params: dict[str, Any] = _bounds(factory=dict, max_items=16)
    capability: str = text("", max_len=2048)
    tied_peer: str = text("")  # tied request: the other copy's worker RPC address
    tie: str = hex_field("")  # the secret that lets the tied peer cancel this copy
    data: str = text("", max_len=MAX_INLINE_TEXT)  # the original, base64, if small ("": download it)
    inline_result: int = number(0, hi=INLINE_MAX_BYTES)  # a result up to this size comes back inline
    # With an object store: presigned URLs for this job only (GET the original, PUT the result)
    original_url: str = _bounds("", max_len=4096, pattern=URL_RE)
    result_url: str = _bounds("", max_len=4096, pattern=URL_RE)


@dataclass(frozen=True)
class CancelJob:
    """Stop a job if it is still running: from the scheduler (sealed), or from a tied peer
    (plain, carrying the attempt's ``tie`` secret; only a copy still waiting is cancelled)."""

    TYPE = "cancel_job"
    job_id: int = number()
    if_not_started: bool = False
    tie: str = hex_field("")


@dataclass(frozen=True)
class JobResult:
    """Worker -> scheduler, the (sealed) reply to :class:`RunJob`."""

    TYPE = "job_result"
    job_id: int = number()
    ok: bool = False
    error: str = text("", max_len=1024)
    retryable: bool = True
    worker: str = text("")
    download_ms: float = number(0.0, hi=1e9)
    process_ms: float = number(0.0, hi=1e9)
    upload_ms: float = number(0.0, hi=1e9)
    started: bool = False  # this copy did (some of) the work: for counting extra work
    data: str = text("", max_len=MAX_INLINE_TEXT)  # the result, base64, when sent inline
    transient: bool = False  # the image store or the API could not be reached: not the job's fault


@dataclass(frozen=True)
class Ack:
    """Generic reply: the request was taken (``ok``) or refused with ``error``."""

    TYPE = "ack"
    ok: bool = True
    error: str = text("", max_len=1024)


@dataclass(frozen=True)
class Sealed:
    """An authenticated envelope: ``mac`` = HMAC-SHA256 over (label, kid, seq, body) with the key
    ``kid`` names. ``body`` is the exact JSON text of the inner message."""

    TYPE = "sealed"
    kid: str = _bounds(pattern=re.compile(r"[0-9a-z]{1,64}"))
    seq: int = number()
    body: str = text(max_len=MAX_MESSAGE_BYTES)
    mac: str = _bounds(pattern=re.compile(r"[0-9a-f]{64}"))


Message = Hello | Heartbeat | Goodbye | Welcome | Joined | RunJob | CancelJob | JobResult | Ack | Sealed
MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls
    for cls in (Hello, Heartbeat, Goodbye, Welcome, Joined, RunJob, CancelJob, JobResult, Ack, Sealed)
}


def inline(data: bytes) -> str:
    """Image bytes as they travel inside a message."""
    return base64.b64encode(data).decode("ascii")


def payload(text_: str) -> bytes:
    """The image bytes of an inline field, or DecodeError if they are not strict base64."""
    try:
        return base64.b64decode(text_, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DecodeError(f"inline image is not base64: {_short(e)}") from None


def encode(msg: Message) -> bytes:
    """Serialise a message to UTF-8 JSON bytes with its type tag and the protocol version."""
    body = _plain(msg)
    body["type"] = msg.TYPE
    body["v"] = VERSION
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def decode(data: bytes) -> Message:
    """Parse bytes into a message, or raise :class:`DecodeError` saying what is wrong.

    Nothing else escapes: the JSON parser's own failures (integers beyond Python's digit limit,
    nesting beyond the recursion limit, NaN and Infinity) are all turned into DecodeError."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    if data.count(b"[") + data.count(b"{") > 256 and _depth(data) > MAX_DEPTH:
        # Never let the parser recurse that deep: besides RecursionError, CPython 3.11 can be
        # left with a skewed recursion counter that breaks later, unrelated code.
        raise DecodeError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        obj = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError, TypeError, OverflowError, MemoryError) as e:
        raise DecodeError(f"not JSON: {_short(e)}") from None
    if not isinstance(obj, dict):
        raise DecodeError("not a JSON object")
    if obj.get("v") != VERSION:
        raise DecodeError(f"unsupported version {_short(obj.get('v'))} (speak {VERSION})")
    kind = obj.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise DecodeError(f"unknown message type {_short(kind)}")
    return _build(cls, obj, cls.TYPE)


def _plain(msg: Any) -> dict[str, Any]:
    """A message's fields as JSON-ready values (``dataclasses.asdict`` deep-copies every value:
    a tenth of a small job's RPC time, for nothing)."""
    return {f.name: _plain(v) if dataclasses.is_dataclass(v := getattr(msg, f.name))
            else [_plain(x) for x in v] if isinstance(v, list) and v and dataclasses.is_dataclass(v[0]) else v
            for f, _ in _fields(type(msg))}


MAX_DEPTH = 16  # our messages nest 3 deep


def _depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects outside strings (a linear scan; only run on
    messages with many brackets, which ours never have)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _short(value: object) -> str:
    """A bounded description of peer input, for error messages and logs."""
    text_ = repr(value)
    return text_ if len(text_) <= 80 else text_[:77] + "..."


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
        kwargs[f.name] = _check(hint, obj[f.name], f"{where}.{f.name}", f.metadata)
    return cls(**kwargs)


def _check(hint: Any, value: Any, where: str, rules: typing.Mapping[str, Any]) -> Any:
    """Validate ``value`` against a (simple) type hint and the field's rules; return it."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise DecodeError(f"{where}: expected an object")
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise DecodeError(f"{where}: expected a list")
        if len(value) > rules.get("max_items", MAX_LIST):
            raise DecodeError(f"{where}: more than {rules.get('max_items', MAX_LIST)} items")
        return [_check(item, v, where, rules) for v in value]
    if origin is dict:
        return _params(value, where, rules.get("max_items", 16))
    if origin in (typing.Union, types.UnionType):
        raise DecodeError(f"{where}: unions are not used on the wire")
    if hint is bool:
        if not isinstance(value, bool):
            raise DecodeError(f"{where}: expected a boolean")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DecodeError(f"{where}: expected an integer")
        return _in_range(value, where, rules)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DecodeError(f"{where}: expected a number")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise DecodeError(f"{where}: number out of range")
        value = float(value)
        if not math.isfinite(value):
            raise DecodeError(f"{where}: not a finite number")
        return _in_range(value, where, rules)
    if hint is str:
        if not isinstance(value, str):
            raise DecodeError(f"{where}: expected a string")
        limit = rules.get("max_len", MAX_TEXT)
        if len(value) > limit:
            raise DecodeError(f"{where}: longer than {limit} characters")
        pattern = rules.get("pattern")
        if pattern is not None and not pattern.fullmatch(value):
            raise DecodeError(f"{where}: {_short(value)} is not of the expected form")
        return value
    raise DecodeError(f"{where}: unsupported field type")


def _in_range(value: int | float, where: str, rules: typing.Mapping[str, Any]) -> Any:
    lo, hi = rules.get("lo", 0), rules.get("hi", MAX_INT)
    if not lo <= value <= hi:
        raise DecodeError(f"{where}: {_short(value)} is outside {lo}..{hi}")
    return value


def _params(value: Any, where: str, max_items: int) -> dict[str, Any]:
    """Filter parameters: a small flat object of short keys and scalar values."""
    if not isinstance(value, dict):
        raise DecodeError(f"{where}: expected an object")
    if len(value) > max_items:
        raise DecodeError(f"{where}: more than {max_items} entries")
    for k, v in value.items():
        if len(k) > 64:
            raise DecodeError(f"{where}: key longer than 64 characters")
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, int):
            _in_range(v, where, {"lo": -MAX_INT, "hi": MAX_INT})
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise DecodeError(f"{where}: not a finite number")
        elif isinstance(v, str):
            if len(v) > MAX_TEXT:
                raise DecodeError(f"{where}: value longer than {MAX_TEXT} characters")
        else:
            raise DecodeError(f"{where}: values must be scalars")
    return value
