"""Multipart/form-data bodies of up to a few MiB, parsed whole from memory in one pass.

aiohttp's :class:`~aiohttp.MultipartReader` streams, which a large upload needs; for a small one
(a thumbnail, a frame of a few KiB) its per-part machinery (stream reads line by line, and a
Content-Disposition parse that costs 128 ``re.escape`` calls) is most of the request's server
time. Here the body is read at once and split on its boundary. Only the plain form every
client sends is taken (quoted ``name`` and ``filename``, no transfer or content encoding, no
nested multipart); anything else gives None, and the caller hands the same bytes to aiohttp's
reader (:func:`reader_over`), which knows the rest of the RFCs.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from aiohttp import MultipartReader, StreamReader, web

from common.budget import ByteBudget
from common.models import BadInput, TooLarge

#: Bodies up to this size (by Content-Length) are read whole and parsed here.
SMALL_BODY = 512 * 1024
#: ... and up to this size too (a 720p frame, a worker's result) while the bytes of such bodies
#: held at once stay within WHOLE_BUDGET; beyond it they are streamed. aiohttp's streaming
#: reader costs the event loop several ms per MB (its per-chunk reads and boundary search).
WHOLE_BODY = 4 << 20
WHOLE_BUDGET = ByteBudget(64 << 20)
#: The Content-Disposition every client sends: plain quoted parameters, nothing to unescape, and
#: no ';' inside a value (aiohttp splits on it before it reads quotes: such a header is left to it,
#: so that both read every body alike).
_PLAIN_DISPOSITION = re.compile(r'form-data((?:\s*;\s*[A-Za-z]+="[^";\\\x00-\x1f\x7f]*")*)\s*;?\s*', re.IGNORECASE)
_PLAIN_PARAM = re.compile(r'([A-Za-z]+)="([^"]*)"')
_BOUNDARY = re.compile(r'multipart/form-data\s*;\s*boundary=(?:"([^"\\\r\n]{1,70})"|([^\s;"]{1,70}))\s*',
                       re.IGNORECASE)
_PLAIN_ENCODINGS = frozenset({"", "binary", "8bit", "7bit", "identity"})


@dataclass(frozen=True)
class Part:
    name: str | None
    filename: str | None
    data: bytes


def plain_disposition(header: str) -> tuple[str | None, str | None] | None:
    """(name, filename) of a plain ``form-data`` Content-Disposition, None for any other (a
    repeated parameter, escapes, RFC 5987 ``filename*=``...). A leading ``/`` is stripped from
    values, as aiohttp's parser does."""
    plain = _PLAIN_DISPOSITION.fullmatch(header)
    if plain is None:
        return None
    params: dict[str, str] = {}
    for key, value in _PLAIN_PARAM.findall(plain.group(1)):
        if key.lower() in params:
            return None
        params[key.lower()] = value.lstrip("/")
    return params.get("name"), params.get("filename")


def small_boundary(request: web.Request) -> bytes | None:
    """The boundary of a multipart/form-data body in plain form small enough to read whole
    (:data:`SMALL_BODY`, or up to :data:`WHOLE_BODY` if :data:`WHOLE_BUDGET` takes its length:
    give it back with :func:`done_with`), or None (stream it)."""
    length = request.content_length
    if length is None or length > WHOLE_BODY:
        return None
    m = _BOUNDARY.fullmatch(request.headers.get("Content-Type", ""))
    if m is None:
        return None
    if length > SMALL_BODY and not WHOLE_BUDGET.take(length):
        return None
    return (m.group(1) or m.group(2)).encode("latin-1")


def done_with(request: web.Request) -> None:
    """A body that :func:`small_boundary` let be read whole is no longer held."""
    length = request.content_length or 0
    if length > SMALL_BODY:
        WHOLE_BUDGET.give(length)


def parse(body: bytes, boundary: bytes, max_fields: int) -> list[Part] | None:
    """The parts of a whole body; None if any is not in plain form. BadInput if the body is not
    multipart at all; TooLarge beyond ``max_fields`` parts besides one file."""
    dash = b"--" + boundary
    delimiter = b"\r\n" + dash
    if body.startswith(dash):
        pos = len(dash)
    else:
        start = body.find(delimiter)  # after a preamble
        if start < 0:
            raise BadInput("malformed multipart body: no boundary")
        pos = start + len(delimiter)
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", pos):
            return parts  # the close delimiter (an epilogue after it is ignored)
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise BadInput("malformed multipart body: a boundary line with more after it")
        if len(parts) > max_fields:
            raise TooLarge(f"too many form fields: at most {max_fields} besides the file")
        end_of_headers = body.find(b"\r\n\r\n", eol)
        end = body.find(delimiter, eol)
        if end < 0:
            raise BadInput("malformed multipart body: no closing boundary")
        if end_of_headers < 0 or end_of_headers > end:
            raise BadInput("malformed multipart body: a part without a blank line after its headers")
        part = _part(body[eol + 2:end_of_headers], body[end_of_headers + 4:end])
        if part is None:
            return None
        parts.append(part)
        pos = end + len(delimiter)


def _part(head: bytes, data: bytes) -> Part | None:
    names: tuple[str | None, str | None] | None = None
    for line in head.split(b"\r\n") if head else ():
        try:
            key, colon, value = line.decode("utf-8").partition(":")
        except UnicodeDecodeError:
            return None
        if not colon or key != key.strip() or not key:
            return None  # folded or odd headers: the full parser judges them
        key, value = key.lower(), value.strip()
        if key == "content-disposition":
            if names is not None:
                return None
            names = plain_disposition(value)
            if names is None:
                return None
        elif key in ("content-transfer-encoding", "content-encoding"):
            if value.lower() not in _PLAIN_ENCODINGS:
                return None
        elif key == "content-type" and value.lower().startswith("multipart/"):
            return None
    if names is None:
        return None
    return Part(names[0], names[1], data)


def reader_over(request: web.Request, body: bytes) -> MultipartReader:
    """aiohttp's streaming reader over a body already read (for what :func:`parse` declined)."""
    stream = StreamReader(request.protocol, max(len(body), 1 << 16), loop=asyncio.get_running_loop())
    stream.feed_data(body)
    stream.feed_eof()
    return MultipartReader(request.headers, stream)
