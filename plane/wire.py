"""The one module that defines what travels over nng between controller, scheduler and workers.

Every message is a frozen dataclass with a ``TYPE`` tag; on the wire it is a JSON object
``{"type": ..., "v": VERSION, ...fields}``. :func:`decode` is the only way bytes become a
message, and whatever the bytes (huge integers, deep nesting, NaN, non-ASCII, wrong types,
long strings), it either returns a message whose every field is within its declared bounds or
raises :class:`DecodeError`. Socket loops can therefore log, count and drop garbage and go on.

Authentication is an envelope, :class:`Sealed` (see :mod:`plane.seal`): binary, a MAC over the
exact bytes of an inner message's JSON header and of the raw binary frames that follow it (the
images a job or a result carries: bytes as bytes, never base64 inside JSON), with a key id and
a sequence number for freshness. Only :class:`Exchange` and :class:`Results` carry frames: each
job or result names its frame by index, and every frame belongs to exactly one of them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import struct
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


def _payload() -> Any:
    """An image carried as a frame of the message, not in its JSON (see :func:`parts`)."""
    return field(default=b"", repr=False, compare=False, metadata={"wire": False})

VERSION = 3

#: Images up to this size travel as frames of the session's messages (originals in an
#: :class:`Exchange`, results in :class:`Results`); larger ones over HTTP with a job capability.
INLINE_MAX_BYTES = 32 << 20
#: With an object store (workers read and write it through presigned URLs), only images up to
#: this size travel with their jobs (an original still in the server's memory, a small result).
DIRECT_INLINE_BYTES = 256 * 1024
#: Bytes of frames one session message gathers before the rest waits for the next one (a
#: single larger image still travels, alone).
BATCH_BYTES = 8 << 20
#: Upper bound for a message of the session (the largest frame and its header fit); larger ones
#: are dropped by nng itself.
MAX_SESSION_BYTES = INLINE_MAX_BYTES + (1 << 20)
#: Upper bound for any other message (pub/sub: hellos, heartbeats, goodbyes).
MAX_MESSAGE_BYTES = 512 * 1024
#: Jobs or results one message carries at most.
MAX_BATCH = 1024
#: The first bytes of a sealed (binary) message: never the start of JSON.
MAGIC = b"\x00DP3"


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
    running_jobs: int = number(0, hi=100_000)  # started (holding a slot)
    waiting_jobs: int = number(0, hi=100_000)  # sent ahead, waiting there for a slot
    capacity: int = number(0, hi=4096)
    prefetch: int = number(0, hi=4096)  # jobs it takes beyond capacity, waiting for a slot
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
    """Worker -> controller, the (sealed) reply to :class:`Welcome`: taken, the filters this
    worker runs, and the port of its session stream (on its RPC address's host: the server
    connects there and sends its :class:`Exchange` messages)."""

    TYPE = "joined"
    filters: list[FilterDeclaration] = _bounds(factory=list, max_items=MAX_FILTERS)
    declares: bool = True  # False: it declares nothing and runs the server's built-ins
    session_port: int = number(0, hi=65535)


@dataclass(frozen=True)
class RunJob:
    """Scheduler -> worker, one job of an :class:`Exchange`: filter one image. Its original is
    ``payload`` (a frame of the message), or fetched from ``original_url`` (an object store), or
    over HTTP with ``capability``, the credential for exactly this job (images too large for a
    frame); its result comes back in :class:`Results`."""

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
    frame: int = number(-1, lo=-1, hi=MAX_BATCH)  # which frame of the Exchange is the original (-1: fetch it)
    inline_result: int = number(0, hi=INLINE_MAX_BYTES)  # a result up to this size comes back as a frame
    # With an object store: presigned URLs for this job only (GET the original, PUT the result)
    original_url: str = _bounds("", max_len=4096, pattern=URL_RE)
    result_url: str = _bounds("", max_len=4096, pattern=URL_RE)
    payload: bytes = _payload()


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
    """Worker -> scheduler, how one job ended, inside :class:`Results`; a small enough result's
    bytes are its ``payload`` (a frame of the message)."""

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
    frame: int = number(-1, lo=-1, hi=MAX_BATCH)  # which frame of the Results is the image (-1: none)
    transient: bool = False  # the image store or the API could not be reached: not the job's fault
    payload: bytes = _payload()


@dataclass(frozen=True)
class Exchange:
    """Server -> worker on the session stream (sealed): the jobs placed on this worker since the
    last one (each original a frame), the jobs to stop, and the result batches received since
    the last one (``acks``). Everything queued in one turn of the server's event loop leaves in
    one Exchange."""

    TYPE = "exchange"
    jobs: list[RunJob] = _bounds(factory=list, max_items=MAX_BATCH)
    cancels: list[int] = _bounds(factory=list, max_items=MAX_BATCH, lo=0, hi=MAX_INT)
    acks: list[int] = _bounds(factory=list, max_items=MAX_BATCH, lo=1, hi=MAX_INT)


@dataclass(frozen=True)
class Results:
    """Worker -> server on the session stream (sealed): jobs that ended (their results' bytes as
    frames) and the jobs whose cancel is complete (their work has stopped, or was not here). A
    numbered ``batch`` is kept by the worker until an Exchange acknowledges it, and sent again
    on the next connection if its own was lost."""

    TYPE = "results"
    batch: int = number(0)
    results: list[JobResult] = _bounds(factory=list, max_items=MAX_BATCH)
    stopped: list[int] = _bounds(factory=list, max_items=MAX_BATCH, lo=0, hi=MAX_INT)


@dataclass(frozen=True)
class Ack:
    """Generic reply: the request was taken (``ok``) or refused with ``error``."""

    TYPE = "ack"
    ok: bool = True
    error: str = text("", max_len=1024)


@dataclass(frozen=True)
class Sealed:
    """An authenticated envelope as it arrived (binary, see :func:`decode`), not yet opened:
    :mod:`plane.seal` checks ``tag`` over ``signed`` with the key ``kid`` names and the nonce,
    then decodes ``header`` (the inner message's JSON) with its ``frames``."""

    TYPE = "sealed"
    kid: str
    seq: int
    nonce: bytes
    tag: bytes
    signed: memoryview  # everything after the tag: what the tag covers
    header: memoryview
    frames: tuple[memoryview, ...] = ()


Message = (Hello | Heartbeat | Goodbye | Welcome | Joined | RunJob | CancelJob | JobResult | Exchange | Results
           | Ack | Sealed)
MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls
    for cls in (Hello, Heartbeat, Goodbye, Welcome, Joined, RunJob, CancelJob, JobResult, Exchange, Results, Ack)
}
#: The messages that carry frames, and the list of their items each frame belongs to.
_FRAMED = {Exchange: "jobs", Results: "results"}


def first_batch(items: list, budget: int = BATCH_BYTES) -> tuple[list, list]:
    """The items (jobs, results) one message takes from the front of ``items``: at most
    MAX_BATCH, their payloads within ``budget`` bytes, but at least one; and the rest."""
    size = n = 0
    while n < len(items) and n < MAX_BATCH and (n == 0 or size + len(items[n].payload) <= budget):
        size += len(items[n].payload)
        n += 1
    return items[:n], items[n:]


class VersionError(DecodeError):
    """A message of another version of the protocol (an older or newer peer)."""

    def __init__(self, version: object) -> None:
        super().__init__(f"a message of protocol version {_short(version)}: this side speaks {VERSION}")
        self.version = version


def encode(msg: Message) -> bytes:
    """Serialise a message (its frames left out: see :func:`parts`) to UTF-8 JSON bytes with its
    type tag and the protocol version."""
    body = _plain(msg)
    body["type"] = msg.TYPE
    body["v"] = VERSION
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def parts(msg: Message) -> tuple[bytes, list[bytes | memoryview]]:
    """A message as its JSON header and its frames: each item's ``payload`` becomes a frame,
    named by the item's ``frame`` index (items without one get -1)."""
    key = _FRAMED.get(type(msg))
    if key is None:
        return encode(msg), []
    frames: list[bytes | memoryview] = []
    items = []
    for item in getattr(msg, key):
        if len(item.payload):
            items.append(dataclasses.replace(item, frame=len(frames)))
            frames.append(item.payload)
        elif item.frame != -1:
            items.append(dataclasses.replace(item, frame=-1))
        else:
            items.append(item)
    return encode(dataclasses.replace(msg, **{key: items})), frames


def _with_frames(msg: Message, frames: tuple[memoryview, ...]) -> Message:
    """A decoded message with each item's frame as its ``payload``: every frame named exactly
    once, every index in range, else DecodeError."""
    key = _FRAMED.get(type(msg))
    if key is None:
        if frames:
            raise DecodeError(f"{msg.TYPE}: carries no frames, got {len(frames)}")
        return msg
    used: set[int] = set()
    items = []
    for item in getattr(msg, key):
        if item.frame == -1:
            items.append(item)
            continue
        if item.frame >= len(frames) or item.frame in used:
            raise DecodeError(f"{msg.TYPE}: frame {item.frame} is missing or named twice")
        used.add(item.frame)
        items.append(dataclasses.replace(item, payload=bytes(frames[item.frame])))
    if len(used) != len(frames):
        raise DecodeError(f"{msg.TYPE}: {len(frames) - len(used)} frame(s) belong to nothing")
    return dataclasses.replace(msg, **{key: items})


def decode_header(header: bytes | memoryview, frames: tuple[memoryview, ...] = ()) -> Message:
    """The inner message of a sealed envelope: its JSON ``header`` (any message but a sealed
    one) and its ``frames``."""
    msg = decode(bytes(header))
    if isinstance(msg, Sealed):
        raise DecodeError("a sealed message inside a sealed message")
    return _with_frames(msg, frames)


_PREFIX = struct.Struct("!16sB")  # tag, key id length
_FIXED = struct.Struct("!Q16sHI")  # seq, nonce, frame count, header length
MAX_FRAMES = MAX_BATCH


#: A sealed message as the pieces it is sent from (the envelope and header, then each frame):
#: joined only by nng as it copies them into its message (:func:`plane.rpc.nng_message`).
Parts = list[bytes | memoryview]


def envelope(kid: str, seq: int, nonce: bytes, header: bytes, frames: list[bytes | memoryview]) -> tuple[bytes, Parts]:
    """A sealed message without its tag: the bytes between the tag and the header (key id,
    sequence number, nonce, frame and header lengths), and what the tag covers, in pieces."""
    k = kid.encode("ascii")
    rest = (bytes((len(k),)) + k + _FIXED.pack(seq, nonce, len(frames), len(header))
            + struct.pack(f"!{len(frames)}I", *(len(f) for f in frames)))
    return rest, [rest, header, *frames]


def sealed_parts(tag: bytes, rest: bytes, header: bytes, frames: list[bytes | memoryview]) -> Parts:
    """The pieces of a sealed message, its tag in place."""
    return [MAGIC + tag + rest + header, *frames]


def join(parts: Parts) -> bytes:
    """A sealed message's pieces as one bytes object (small messages, tests)."""
    return b"".join(parts)


def _open_envelope(data: bytes) -> Sealed:
    view = memoryview(data)
    at = len(MAGIC)
    try:
        tag, klen = _PREFIX.unpack_from(view, at)
        at += _PREFIX.size
        kid = bytes(view[at:at + klen]).decode("ascii")
        at += klen
        seq, nonce, count, hlen = _FIXED.unpack_from(view, at)
        at += _FIXED.size
        if count > MAX_FRAMES:
            raise DecodeError(f"sealed message with {count} frames (at most {MAX_FRAMES})")
        lengths = struct.unpack_from(f"!{count}I", view, at)
    except (struct.error, UnicodeDecodeError):
        raise DecodeError("a sealed message cut short or garbled") from None
    at += 4 * count
    if not _KID_RE.fullmatch(kid):
        raise DecodeError("sealed message with a malformed key id")
    if hlen > MAX_MESSAGE_BYTES or at + hlen + sum(lengths) != len(view):
        raise DecodeError("sealed message whose lengths do not add up")
    header = view[at:at + hlen]
    at += hlen
    frames = []
    for n in lengths:
        frames.append(view[at:at + n])
        at += n
    return Sealed(kid, seq, nonce, tag, view[len(MAGIC) + 16:], header, tuple(frames))


_KID_RE = re.compile(r"[0-9a-z]{1,64}")


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse bytes into a message, or raise :class:`DecodeError` saying what is wrong. A sealed
    message comes back as a :class:`Sealed` envelope, to be opened by :mod:`plane.seal`.

    Nothing else escapes: the JSON parser's own failures (integers beyond Python's digit limit,
    nesting beyond the recursion limit, NaN and Infinity) are all turned into DecodeError."""
    if len(data) > max_bytes:
        raise DecodeError(f"message of {len(data)} bytes exceeds {max_bytes}")
    if data[:len(MAGIC)] == MAGIC:
        return _open_envelope(data)
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
        raise VersionError(obj.get("v"))
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
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("wire", True))


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
