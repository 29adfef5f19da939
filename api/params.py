"""Request parsing: parameters may come in the query string, a form, a JSON body or a multipart
body, on any method (the reference's pull client sends a form body on a GET)."""

from __future__ import annotations

import base64
import binascii
import json
import re
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from api import peer
from api.keys import SETTINGS
from controller.models import BadInput, TooLarge, Unauthorized, quoted

#: What aiohttp's multipart reader raises on a malformed body.
MULTIPART_ERRORS = (ValueError, AssertionError, HttpProcessingError)
#: Non-file fields of a multipart body are held in memory: at most this many, this large in all.
MAX_FIELDS = 32
MAX_FIELD_BYTES = 64 * 1024


def client_address(request: web.Request) -> str:
    """The caller's address: the socket's peer, or behind a ``--trusted-proxy`` the client it
    forwarded (``X-Forwarded-For``). Throttling and loopback checks key on this."""
    return peer.client_address(request.remote or "", request.headers.getall("X-Forwarded-For", []),
                               request.app[SETTINGS].trusted_proxies)


class FieldBudget:
    """Reads the non-file fields of one multipart body, within MAX_FIELDS and MAX_FIELD_BYTES."""

    def __init__(self) -> None:
        self.fields = 0
        self.left = MAX_FIELD_BYTES

    async def read(self, part: BodyPartReader, name: str) -> str:
        """The field's text; :class:`TooLarge` (413) once the body has too many or too much."""
        self.fields += 1
        if self.fields > MAX_FIELDS:
            raise TooLarge(f"too many form fields: at most {MAX_FIELDS} besides the file")
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
        self.left -= len(text)
        return text.decode("utf-8", "replace")

    def _check(self, size: int) -> None:
        if size > self.left:
            raise TooLarge(f"form fields too large: at most {MAX_FIELD_BYTES} bytes of text in all")


#: The Content-Disposition every client sends: plain quoted parameters, nothing to unescape.
_PLAIN_DISPOSITION = re.compile(r'form-data((?:\s*;\s*[A-Za-z]+="[^"\\\r\n]*")*)\s*;?\s*', re.IGNORECASE)
_PLAIN_PARAM = re.compile(r'([A-Za-z]+)="([^"]*)"')


def part_names(part: BodyPartReader) -> tuple[str | None, str | None]:
    """A part's (name, filename), parsing its Content-Disposition once. (aiohttp's ``name`` and
    ``filename`` parse it again on every access, at a cost of 128 ``re.escape`` calls each:
    a fifth of a small upload's server time.) Anything but plain quoted parameters, such as
    escapes or RFC 5987 ``filename*=``, goes to aiohttp's full parser."""
    plain = _PLAIN_DISPOSITION.fullmatch(part.headers.get(hdrs.CONTENT_DISPOSITION, ""))
    if plain is not None:
        params: dict[str, str] = {}
        for key, value in _PLAIN_PARAM.findall(plain.group(1)):
            if key.lower() in params:
                break  # a repeated parameter: let the full parser judge it
            params[key.lower()] = value.lstrip("/")  # as aiohttp does
        else:
            return params.get("name"), params.get("filename")
    return part.name, part.filename


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
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader):
                    continue
                name, filename = part_names(part)
                if name and not filename:
                    params[name] = await fields.read(part, name)
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
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise BadInput(f"malformed JSON body: {e}") from e
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
    if isinstance(v, list):
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
