"""/openapi.json is true: every route is described, and schemathesis, generating requests from
the description, finds no 5xx and no response that breaks its schema on a live server."""

from __future__ import annotations

import json
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)

from api import openapi
from server.services import build_app
from server.settings import ServerSettings
from tests.helpers import ADMIN_PASSWORD, png, push, ref, wait_completed, workload

#: Left to their own tests: /logout would revoke the token mid-run, /events never ends.
NOT_FUZZED = {("DELETE", "/logout"), ("GET", "/events")}


def test_every_route_is_described(tmp_path):
    app = build_app(ServerSettings(data_dir=tmp_path))
    routes = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and not r.resource.canonical.startswith("/static")}
    described = {(m.upper(), p) for p, ops in openapi.spec()["paths"].items() for m in ops}
    assert routes == described


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from tests.helpers import LocalSystem

    base = tmp_path_factory.mktemp("openapi")
    s = LocalSystem(base / "data", log_dir=base / "logs", admin_password=ADMIN_PASSWORD)
    with s:  # its logs are printed if this fails
        s.start_server()
        s.start_worker("oa-1")
        s.wait_workers({"oa-1"})
        token = s.login()
        wid = workload(s.url, token)  # something real to find: a finished workload with images
        push(s, token, wid, {0: png((200, 10, 10)), 1: png((10, 10, 200))})
        wait_completed(s.url, token, wid)
        yield s, token


def operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_finds_no_5xx_and_no_schema_violation(live, mode):
    system, token = live
    ops = [op for op in operations(system.url) if (op.method.upper(), op.path) not in NOT_FUZZED]
    assert len(ops) >= 12
    headers = {"Authorization": f"Bearer {token}"}
    for op in ops:
        @settings(max_examples=30, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case):
            response = case.call(base_url=system.url, headers=headers, timeout=30)
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance,
                                                     content_type_conformance])

        try:
            check()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # nothing to get wrong: no parameters, no body
    # and the token still works: nothing above broke the server or logged us out
    assert ref.get_json(system.url, token, "/status")["workers"][0]["name"] == "oa-1"


def test_event_stream_sends_a_snapshot_then_changes(live):
    system, token = live
    request = urllib.request.Request(f"{system.url}/events", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        events = []  # (event, data): the worker's heartbeats change its entry, so changes come
        kind, lines = None, iter(resp)
        while len(events) < 2:
            line = next(lines).decode()
            if line.startswith("event: "):
                kind = line[7:].strip()
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    (first, snap), (second, changes) = events
    assert first == "snapshot" and second == "changes"
    assert [w["name"] for w in snap["workers"]] == ["oa-1"] and snap["queued_jobs"] >= 0
    assert snap["workloads"] and all({"filtered", "failed", "status"} <= set(w) for w in snap["workloads"])
    assert changes["server_time"] > snap["server_time"]
    assert set(changes) <= {"server_time", "workers", "workloads", "queued_jobs", "autoscale"}
    r = ref.request(system.url, "GET", "/events")
    assert r.status == 401


def test_event_stream_ends_when_its_token_is_revoked(live):
    system, _ = live
    token = system.login()  # its own token: the module's one stays valid
    request = urllib.request.Request(f"{system.url}/events", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        lines = iter(resp)
        while not next(lines).startswith(b"data: "):
            pass
        assert ref.request(system.url, "DELETE", "/logout", headers=ref.bearer(token)).status == 200
        rest = b"".join(lines)  # the server closes the stream: this returns (a hang would time out)
    assert rest.count(b"data: ") <= 1
