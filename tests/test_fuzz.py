"""Property-based fuzzing (hypothesis), bounded in time: the wire decoder and the HTTP request
parsing never fail other than with their own clear errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.app import create_app
from common import wire

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["type", "v", "name", "session", "rpc_address", "tags", "cpu_percent", "gpu", "job_id",
     "workload_id", "image_id", "filter", "attempt", "params", "ok", "error", "token", "epoch",
     "api_port", "public_url", "heartbeat_interval", "running_job_ids", "if_not_started"]
)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(wire.MESSAGE_TYPES)), "v": st.sampled_from([1, 1, 1, 2, "1"])},
    optional={},
).flatmap(lambda base: st.dictionaries(field_names, json_values, max_size=12).map(lambda d: {**d, **base}))


@FUZZ
@given(st.binary(max_size=2048))
def test_decode_random_bytes(data):
    try:
        wire.decode(data)
    except wire.DecodeError:
        pass


@FUZZ
@given(messages)
def test_decode_message_shaped_json(obj):
    """Right tags, wrong or missing fields: a message of the right types, or a DecodeError."""
    try:
        msg = wire.decode(json.dumps(obj).encode())
    except wire.DecodeError:
        return
    assert wire.decode(wire.encode(msg)) == msg  # whatever decodes, round-trips


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


@pytest.fixture
async def fuzz_client(aiohttp_client, settings):
    client = await aiohttp_client(create_app(settings))
    r = await client.get("/login", auth=None, headers={"Authorization": "Basic YWRtaW46dGVzdC1hZG1pbi1wdw=="})
    token = (await r.json())["token"]
    return client, token


async def test_http_request_parsing_never_breaks(fuzz_client):
    """Random bodies, content types and query strings on every endpoint: a JSON 4xx or a 2xx,
    never a 5xx, and the server keeps serving."""
    client, token = fuzz_client
    seen: list[int] = []

    @FUZZ
    @given(requests)
    def run(req):
        seen.append(req)

    run()  # hypothesis draws the examples synchronously; we replay them on the event loop
    for (method, path), ctype, body, query in seen:
        headers = {"Authorization": f"Bearer {token}"}
        if ctype:
            headers["Content-Type"] = ctype
        r = await client.request(method, f"{path}?{query}", data=body, headers=headers)
        assert r.status < 500, (method, path, ctype, body[:80], query, await r.text())
        if r.status >= 400:
            assert r.content_type == "application/json"
            assert "error" in await r.json()
    r = await client.get("/status", headers={"Authorization": f"Bearer {token}"})
    assert r.status == 200
