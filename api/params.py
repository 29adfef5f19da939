"""Request parsing: parameters may come in the query string, a form, a JSON body or a multipart
body, on any method (the reference's pull client sends a form body on a GET)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from api import multipart, net
from api.keys import SETTINGS
from common.models import BadInput, TooLarge, Unauthorized, clipped, json_loads, quoted

#: What aiohttp's multipart reader raises on a malformed body.
MULTIPART_ERRORS = (ValueError, AssertionError, HttpProcessingError)
#: Non-file fields of a multipart body are held in memory: at most this many, this large in all.
MAX_FIELDS = 32
MAX_FIELD_BYTES = 64 * 1024


def client_address(request: web.Request) -> str:
    """The caller's address: the socket's peer, or behind a ``--trusted-proxy`` the client it
    forwarded (``X-Forwarded-For``). Throttling and loopback checks key on this."""
    return net.client_address(request.remote or "", request.headers.getall("X-Forwarded-For", []),
                               request.app[SETTINGS].trusted_proxies)


class FieldBudget:
    """Reads the non-file fields of one multipart body, within MAX_FIELDS and MAX_FIELD_BYTES."""

    def __init__(self) -> None:
        self.fields = 0
        self.left = MAX_FIELD_BYTES

    async def read(self, part: BodyPartReader | bytes, name: str) -> str:
        """The field's text; :class:`TooLarge` (413) once the body has too many or too much."""
        self.fields += 1
        if self.fields > MAX_FIELDS:
            raise TooLarge(f"too many form fields: at most {MAX_FIELDS} besides the file")
        if isinstance(part, bytes):  # from a small body parsed in memory: no encoding to undo
            self._check(len(part))
            text = part
        else:
            text = await self._decoded(part, name)
        self.left -= len(text)
        return text.decode("utf-8", "replace")

    async def _decoded(self, part: BodyPartReader, name: str) -> bytes:
        raw = bytearray()
        while chunk := await part.read_chunk(8192):
            raw += chunk
            self._check(len(raw))
        text = bytearray()
        try:
            async for piece in part.decode_iter(raw):  # a gzip'ed field may expand: checked too
                text += piece
                self._check(len(text))
        except RuntimeError as e:  # what aiohttp raises on an unknown Content-Encoding
            raise BadInput(f"form field {quoted(name)}: {e}") from e
        return bytes(text)

    def _check(self, size: int) -> None:
        if size > self.left:
            raise TooLarge(f"form fields too large: at most {MAX_FIELD_BYTES} bytes of text in all")


def part_names(part: BodyPartReader) -> tuple[str | None, str | None]:
    """A part's (name, filename), parsing its Content-Disposition once. (aiohttp's ``name`` and
    ``filename`` parse it again on every access, at a cost of 128 ``re.escape`` calls each.)
    Anything but plain quoted parameters goes to aiohttp's full parser."""
    plain = multipart.plain_disposition(part.headers.get(hdrs.CONTENT_DISPOSITION, ""))
    return plain if plain is not None else (part.name, part.filename)


async def form_parts(request: web.Request) -> AsyncIterator[tuple[str | None, str | None, BodyPartReader | bytes]]:
    """(name, filename, content) of each part of a multipart body: a small body read whole
    and split in memory (content: bytes), a large one streamed (content: aiohttp's part)."""
    boundary = multipart.small_boundary(request)
    if boundary is None:
        async for part in await request.multipart():
            if isinstance(part, BodyPartReader):
                yield (*part_names(part), part)
        return
    try:
        body = await _whole_body(request)
        parts = multipart.parse(body, boundary, MAX_FIELDS)
        if parts is not None:
            del body
            for part in parts:
                yield part.name, part.filename, part.data
            return
        async for part in multipart.reader_over(request, body):
            if isinstance(part, BodyPartReader):
                yield (*part_names(part), part)
    finally:
        multipart.done_with(request)


async def _whole_body(request: web.Request) -> bytes:
    """A body :func:`multipart.small_boundary` let be read whole: past ``client_max_size`` (the
    bound of ``request.read()``) when its budget allowed it, up to its Content-Length."""
    length = request.content_length or 0
    if length <= multipart.SMALL_BODY:
        return await request.read()
    try:
        return await request.content.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise BadInput(f"the body ended after {len(e.partial)} of its {length} bytes") from e


def content_type(request: web.Request) -> str:
    """The bare media type, lower-cased. (aiohttp's ``request.content_type`` runs the email
    package's header parser on every call: a tenth of a small upload's server time.)"""
    return request.headers.get("Content-Type", "").partition(";")[0].strip().lower()


async def request_params(request: web.Request) -> dict[str, str]:
    """Query-string parameters, overlaid with those of the body, whatever its encoding."""
    params: dict[str, str] = dict(request.query)
    if not request.body_exists:
        return params
    ctype = content_type(request)
    if ctype == "multipart/form-data":
        fields = FieldBudget()
        try:
            async for name, filename, content in form_parts(request):
                if name and not filename:
                    params[name] = await fields.read(content, name)
        except MULTIPART_ERRORS as e:
            raise BadInput(f"malformed multipart body: {e}") from e
        return params
    body = await request.read()  # bounded by client_max_size (413 beyond)
    if not body.strip():
        return params
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput("request body is not UTF-8") from e
    if ctype == "application/json" or (ctype == "application/octet-stream" and text.lstrip()[:1] == "{"):
        try:
            obj = json_loads(text)
        except (ValueError, RecursionError) as e:  # also an integer of over 4300 digits
            raise BadInput(f"malformed JSON body: {clipped(str(e))}") from e
        if not isinstance(obj, dict):
            raise BadInput("JSON body must be an object")
        params.update({k: _scalar(v) for k, v in obj.items() if v is not None})
        return params
    # Form-encoded, or anything else that looks like it (curl -d sends x-www-form-urlencoded).
    try:
        params.update(parse_qsl(text, keep_blank_values=True, strict_parsing=False))
    except ValueError as e:
        raise BadInput(f"malformed form body: {e}") from e
    return params


def _scalar(v: object) -> str:
    if isinstance(v, dict):
        return json.dumps(v)
    if isinstance(v, list):  # tags as an array; a pipeline as an array of {"name", "params"}
        if any(isinstance(x, (dict, list)) for x in v):
            return json.dumps(v)
        return ",".join(str(x) for x in v)
    return str(v)


def basic_credentials(request: web.Request) -> tuple[str, str]:
    """User and password from ``Authorization: Basic ...``."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        raise Unauthorized("log in with HTTP Basic authentication (curl -u user:password)")
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError) as e:
        raise Unauthorized("malformed Basic credentials") from e
    if not sep or not user:
        raise Unauthorized("malformed Basic credentials: expected user:password")
    return user, password


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("missing token: send 'Authorization: Bearer <token>' (get one from /login)")
    return value.strip()


#: SQLite integers are 64-bit signed; a larger id would be a 500 instead of a 400 or 404.
MAX_INT = 2**63 - 1


def int_param(params: dict[str, str], name: str, required: bool = True, maximum: int = MAX_INT) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        if required:
            raise BadInput(f"missing parameter {name!r}")
        return None
    try:
        value = int(raw)
    except ValueError as e:
        raise BadInput(f"{name} must be an integer, got {quoted(raw)}") from e
    if value < 0:
        raise BadInput(f"{name} must not be negative")
    if value > maximum:
        raise BadInput(f"{name} must be at most {maximum}")
    return value


def required(params: dict[str, str], name: str) -> str:
    value = params.get(name, "").strip()
    if not value:
        raise BadInput(f"missing parameter {name!r}")
    return value
