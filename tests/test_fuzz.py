"""Property-based fuzzing (hypothesis), bounded in time: the wire decoder and the HTTP request
parsing never fail other than with their own clear errors."""

from __future__ import annotations

import dataclasses
import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plane import wire
from plane.seal import C2W, W2C, ReplayWindow, SealError, open_with, seal_with
from tests.helpers import ref

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
#: What an attacker puts in a field: huge integers, non-finite numbers, non-ASCII and very
#: long strings, wrong types, nesting.
hostile_values = st.one_of(
    json_values,
    st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 2**53 + 1]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
    st.text(min_size=5000, max_size=6000, alphabet="ab"),
    st.lists(st.integers(), min_size=5000, max_size=5000),
)
field_names = st.sampled_from(sorted({f.name for cls in wire.MESSAGE_TYPES.values()
                                      for f in dataclasses.fields(cls)} | {"gpu", "type", "v"}))
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(wire.MESSAGE_TYPES)), "v": st.sampled_from([2, 2, 2, 1, "2", 2.0])},
).flatmap(lambda base: st.dictionaries(field_names, hostile_values, max_size=12).map(lambda d: {**d, **base}))


def _raw(obj) -> bytes:
    """JSON as an attacker may write it: NaN and Infinity allowed, any unicode."""
    return json.dumps(obj, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _check_decoded(msg) -> None:
    """Whatever decodes is within bounds: it re-encodes as strict JSON and round-trips."""
    data = wire.encode(msg)  # allow_nan=False: raises on NaN/Infinity
    assert len(data) <= wire.MAX_MESSAGE_BYTES * 2
    assert wire.decode(data) == msg


@FUZZ
@given(st.binary(max_size=2048))
def test_decode_random_bytes(data):
    try:
        msg = wire.decode(data)
    except wire.DecodeError:
        return
    _check_decoded(msg)  # (a DecodeError of the round trip is a bug, not swallowed)


@FUZZ
@given(messages)
def test_decode_message_shaped_json(obj):
    """Right tags, hostile fields: a message whose every field is in bounds, or a DecodeError."""
    try:
        msg = wire.decode(_raw(obj))
    except wire.DecodeError:
        return
    _check_decoded(msg)


@FUZZ
@given(st.integers(min_value=1, max_value=200_000), st.sampled_from([b"[", b'{"a":', b"[[{"]))
def test_decode_deep_nesting(depth, opener):
    with pytest.raises(wire.DecodeError):
        wire.decode(opener * depth)


@FUZZ
@given(st.sampled_from(sorted(wire.MESSAGE_TYPES)), st.text(min_size=1, max_size=20))
def test_decode_never_lets_a_peer_choose_the_exception(kind, junk):
    """Numbers of any size, in any field: DecodeError only (once a 5000-digit integer raised
    ValueError and stopped the controller's loop)."""
    for blob in (b'{"v": 3, "type": "%s", "job_id": %s}' % (kind.encode(), b"9" * 5000),
                 b'{"v": 3, "type": "%s", "name": "%s"}' % (kind.encode(), junk.encode("utf-8", "surrogatepass"))):
        try:
            wire.decode(blob)
        except wire.DecodeError:
            pass


bodies = st.one_of(
    st.binary(max_size=512),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=12), st.text(max_size=30), max_size=5).map(
        lambda d: "&".join(f"{k}={v}" for k, v in d.items()).encode("utf-8", "surrogatepass")
    ),
)
content_types = st.sampled_from([
    "", "application/json", "application/x-www-form-urlencoded", "text/plain",
    "multipart/form-data; boundary=zz", "multipart/form-data", "application/octet-stream",
])
requests = st.tuples(
    st.sampled_from([("POST", "/workloads"), ("GET", "/images/0"), ("GET", "/images"),
                     ("POST", "/images"), ("GET", "/login"), ("GET", "/workloads/x")]),
    content_types,
    bodies,
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789=&_%./-", max_size=40),
)


@pytest.fixture(scope="module")
def fuzz_token(system) -> str:
    return ref.login(system.url, "admin", system.admin_password)


@FUZZ
@given(requests)
def test_http_request_parsing_never_breaks(system, fuzz_token, req):
    """Random bodies, content types and query strings on every endpoint of a live server: a JSON
    4xx or a 2xx, never a 5xx (hypothesis shrinks a failure to its smallest request)."""
    (method, path), ctype, body, query = req
    headers = {"Authorization": f"Bearer {fuzz_token}"}
    if ctype:
        headers["Content-Type"] = ctype
    r = ref.request(system.url, method, f"{path}?{quote(query, safe='=&_%./-')}", body, headers)
    assert r.status < 500, (r.status, r.body[:200])
    if r.status >= 400:
        assert r.headers["content-type"].startswith("application/json")
        assert "error" in r.json()
    # and the server still serves everyone after it
    assert ref.request(system.url, "GET", "/status", headers=ref.bearer(fuzz_token)).status == 200


@FUZZ
@given(st.lists(st.integers(min_value=1, max_value=20_000), max_size=300), st.integers(min_value=1, max_value=64))
def test_replay_window_accepts_each_sequence_number_once(seqs, size):
    """Against a model: fresh iff never seen and not older than the window below the highest."""
    window, seen, highest = ReplayWindow(size), set(), 0
    for seq in seqs:
        expected = seq not in seen and seq > highest - size
        assert window.fresh(seq) == expected
        if expected:
            seen.add(seq)
            highest = max(highest, seq)


@FUZZ
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32), st.integers(0, 2**53))
def test_a_seal_opens_only_with_its_key_and_label(key, other, seq):
    msg = wire.CancelJob(seq)
    sealed = wire.decode(wire.join(seal_with(key, "ab", C2W, seq, msg)))
    assert open_with(key, sealed, C2W) == msg
    with pytest.raises(SealError):
        open_with(key, sealed, W2C)  # a reflected message
    if other != key:
        with pytest.raises(SealError):
            open_with(other, sealed, C2W)


@FUZZ
@given(st.binary(min_size=32, max_size=32), st.lists(st.binary(max_size=64), max_size=6), st.data())
def test_a_sealed_batch_keeps_its_frames_and_any_change_breaks_it(key, images, data):
    """Frames travel raw after the header, each named by one item: they come back as sent, and
    flipping any byte of the message (header, lengths, frames) or cutting it is refused."""
    jobs = [wire.RunJob(i, "w", i, "grayscale", 1, payload=img) for i, img in enumerate(images)]
    sent = wire.join(seal_with(key, "ab", C2W, 3, wire.Exchange(jobs, cancels=[7])))
    got = open_with(key, wire.decode(sent, wire.MAX_SESSION_BYTES), C2W)
    assert [bytes(j.payload) for j in got.jobs] == images and got.cancels == [7]
    at = data.draw(st.integers(0, len(sent) - 1))
    broken = bytearray(sent)
    broken[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(wire.DecodeError):  # SealError is one
        open_with(key, wire.decode(bytes(broken), wire.MAX_SESSION_BYTES), C2W)
    with pytest.raises(wire.DecodeError):
        open_with(key, wire.decode(sent[:data.draw(st.integers(0, len(sent) - 1))], wire.MAX_SESSION_BYTES), C2W)
