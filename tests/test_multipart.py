"""The in-memory multipart parser against aiohttp's streaming reader, on the bodies real clients
send and on arbitrary ones: where it takes a body it must read exactly what aiohttp reads, and
whatever the bytes it answers parts, None (aiohttp's turn) or a 4xx error, nothing else."""

from __future__ import annotations

import asyncio
import warnings

import aiohttp
import pytest
import requests
from aiohttp import BodyPartReader, MultipartReader, StreamReader
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from api import multipart
from common.models import BadInput, TooLarge
from tests.helpers import ref


class _Protocol:
    def pause_reading(self, **_) -> None: ...
    def resume_reading(self, **_) -> None: ...


async def _aiohttp_parts(body: bytes, content_type: str) -> list[tuple[str | None, str | None, bytes]]:
    stream = StreamReader(_Protocol(), len(body) + 1, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
    stream.feed_data(body)
    stream.feed_eof()
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        async for part in MultipartReader(CIMultiDict({"Content-Type": content_type}), stream):
            assert isinstance(part, BodyPartReader)
            out.append((part.name, part.filename, bytes(await part.read())))
    return out


def _ours(body: bytes, content_type: str) -> list[tuple[str | None, str | None, bytes]] | None:
    boundary = content_type.split("boundary=", 1)[1].strip('"').encode()
    parts = multipart.parse(body, boundary, 32)
    return None if parts is None else [(p.name, p.filename, p.data) for p in parts]


def _requests_body() -> tuple[bytes, str]:
    prepared = requests.Request("POST", "http://x/images", data={"workload_id": "w1"},
                                files={"data": ("0.png", b"\x89PNG\r\n--x\r\n", "image/png")}).prepare()
    return prepared.body, prepared.headers["Content-Type"]  # type: ignore[return-value]


def _aiohttp_body() -> tuple[bytes, str]:
    form = aiohttp.FormData({"workload_id": "w1"})
    form.add_field("data", b"\r\n\r\nbytes\r\n", filename="a b.png", content_type="image/png")
    payload = form()

    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()

        async def write(self, chunk: bytes) -> None:
            self.data += chunk

    sink = Sink()
    asyncio.run(payload.write(sink))  # type: ignore[arg-type]
    return bytes(sink.data), payload.content_type


def _curl_like() -> tuple[bytes, str]:
    b = "------------------------d74496d66958873e"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"workload_id\"\r\n\r\nw1\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\nPNGDATA\r\n--{b}--\r\n").encode()
    return body, f"multipart/form-data; boundary={b}"


@pytest.mark.parametrize("make", [
    lambda: ref.multipart({"workload_id": "w1", "type": "original"}, "data", "0.png", b"\x00\r\n--\xff"),
    _requests_body, _curl_like,
])
async def test_the_bodies_clients_send_read_as_aiohttp_reads_them(make):
    body, ctype = make()
    ours = _ours(body, ctype)
    assert ours is not None, "a plain body is ours to parse"
    assert ours == await _aiohttp_parts(body, ctype)


async def test_aiohttps_own_bodies_too():
    body, ctype = await asyncio.to_thread(_aiohttp_body)
    ours = _ours(body, ctype)
    assert ours is not None and [(n, d) for n, _, d in ours] == [("workload_id", b"w1"), ("data", b"\r\n\r\nbytes\r\n")]
    assert ours == await _aiohttp_parts(body, ctype)


def test_what_is_not_plain_goes_to_aiohttp():
    b = "bnd"
    for headers in ('Content-Disposition: form-data; name="a"; filename*=utf-8\'\'%C3%A9.png',
                    'Content-Disposition: form-data; name="a"\r\nContent-Encoding: gzip',
                    'Content-Disposition: form-data; name="a\\"b"',
                    'Content-Type: text/plain'):
        body = f"--{b}\r\n{headers}\r\n\r\nx\r\n--{b}--\r\n".encode()
        assert multipart.parse(body, b.encode(), 32) is None, headers


def test_broken_bodies_are_4xx():
    for body in (b"no boundary at all", b"--bnd\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nunfinished",
                 b"--bnd junk\r\n\r\n\r\n--bnd--", b"--bnd\r\nContent-Disposition: form-data; name=\"a\"\r\nx\r\n--bnd--"):
        with pytest.raises(BadInput):
            multipart.parse(body, b"bnd", 32)
    many = b"".join(b"--bnd\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nx\r\n" % i for i in range(40))
    with pytest.raises(TooLarge):
        multipart.parse(many + b"--bnd--\r\n", b"bnd", 32)


_names = st.text(st.characters(exclude_characters='"\\\r\n', exclude_categories=("Cs",)), max_size=12)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_names, st.one_of(st.none(), _names), st.binary(max_size=64)), min_size=1, max_size=5),
       st.binary(max_size=16))
def test_any_plain_body_reads_as_aiohttp_reads_it(parts, preamble):
    b = "XbndX"
    body = preamble.replace(b"--", b"") + b"\r\n"
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{b}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data.replace(b"--", b"-") + b"\r\n"
    body += f"--{b}--\r\n".encode()
    ctype = f"multipart/form-data; boundary={b}"
    ours = _ours(body, ctype)
    if ours is not None:
        assert ours == asyncio.run(_aiohttp_parts(body, ctype))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_parts_none_or_a_4xx(body):
    try:
        multipart.parse(b"--bnd\r\n" + body, b"bnd", 32)
    except (BadInput, TooLarge):
        pass
