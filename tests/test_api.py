"""Every endpoint's success and documented errors, against the real app and a real SQLite file."""

from __future__ import annotations

import time

import jwt
import pytest

from api.keys import AUTH, MEMBERSHIP, STORE
from controller.auth import WORKER
from controller.workers import WorkerInfo, WorkerState
from plane import seal
from plane.seal import Channel
from tests.helpers import (
    ADMIN_PASSWORD,
    assert_error,
    basic,
    bearer,
    login,
    new_workload,
    png_bytes,
    upload,
)

# -- login / logout / tokens ----------------------------------------------------------------

async def test_login_get_and_post_with_basic_auth(client):
    for method in ("GET", "POST"):
        r = await client.request(method, "/login", headers=basic("admin", ADMIN_PASSWORD))
        assert r.status == 200
        body = await r.json()
        assert body["user"] == "admin" and body["token"].count(".") == 2


@pytest.mark.parametrize("headers, words", [
    ({}, ["Basic"]),
    (basic("admin", "wrong"), ["wrong user name or password"]),
    (basic("nobody", "x"), ["wrong user name or password"]),
    ({"Authorization": "Basic !!!notbase64"}, ["malformed"]),
])
async def test_login_refused(client, headers, words):
    r = await client.get("/login", headers=headers)
    await assert_error(r, 401, *words)


@pytest.mark.parametrize("headers, words", [
    ({}, ["missing token"]),
    ({"Authorization": "Bearer not-a-jwt"}, ["invalid token"]),
    ({"Authorization": "Token abc"}, ["missing token"]),
])
async def test_missing_or_bad_token_is_401(client, headers, words):
    for method, path in [("GET", "/status"), ("POST", "/workloads"), ("GET", "/workloads/x"),
                         ("POST", "/images"), ("GET", "/images/0"), ("GET", "/images"),
                         ("DELETE", "/logout")]:
        r = await client.request(method, path, headers=headers)
        await assert_error(r, 401, *words)


async def test_forged_and_expired_tokens_are_401(client):
    forged = jwt.encode({"sub": "admin", "scope": "user", "jti": "x", "exp": time.time() + 60},
                        "an-attacker-secret-of-32-bytes!!", algorithm="HS256")
    await assert_error(await client.get("/status", headers=bearer(forged)), 401, "invalid token")
    expired = client.app[AUTH].issue("admin", "user", ttl=-10)
    await assert_error(await client.get("/status", headers=bearer(expired)), 401, "expired")


async def test_logout_revokes_the_token_and_only_that_one(client):
    token, other = await login(client), await login(client)
    r = await client.delete("/logout", headers=bearer(token))
    assert r.status == 200 and "logout_message" in await r.json()
    await assert_error(await client.get("/status", headers=bearer(token)), 401, "revoked")
    assert (await client.get("/status", headers=bearer(other))).status == 200
    # The revocation is persisted, not just remembered.
    assert client.app[AUTH].verify(other, ("user",))
    assert len(await client.app[STORE].revoked_tokens()) == 1


async def test_worker_tokens_of_old_and_capabilities_cannot_use_user_endpoints(client):
    wtoken = client.app[AUTH].issue("w1", WORKER)  # as earlier versions issued them
    await assert_error(await client.post("/workloads", headers=bearer(wtoken)), 403, "worker")
    await assert_error(await client.get("/status", headers=bearer(wtoken)), 403)
    cap = job_capability(client.app, "w1", "some-workload", 0)
    await assert_error(await client.post("/workloads", headers=bearer(cap)), 401, "invalid token")
    await assert_error(await client.get("/images", headers=bearer(cap), params={"workload_id": "x"}), 401)


def job_capability(app, worker: str, workload_id: str, image_id: int, alive: bool = True) -> str:
    """Make ``worker`` a member of the in-process app's membership (as a welcome would) and
    return a capability for one of its jobs."""
    membership = app[MEMBERSHIP]
    kid, key = seal.new_key()
    info = WorkerInfo(worker, state=WorkerState.ALIVE if alive else WorkerState.GONE,
                      channel=Channel(key, kid, seal.C2W, seal.W2C))
    membership.workers[worker] = info
    return membership.capabilities.issue(worker, 1, workload_id, image_id, "grayscale", time.time() + 60)


# -- workloads ------------------------------------------------------------------------------

async def test_bare_post_creates_a_grayscale_workload_with_a_generated_name(client):
    token = await login(client)
    r = await client.post("/workloads", headers=bearer(token))  # no body, no content type
    assert r.status == 200
    w = await r.json()
    assert w["filter"] == "grayscale" and w["status"] == "scheduling"
    assert w["running_jobs"] == 0 and w["filtered_images"] == []
    assert w["workload_name"] and w["workload_id"]
    w2 = await new_workload(client, token)
    assert w2["workload_name"] != w["workload_name"] and w2["workload_id"] != w["workload_id"]


async def test_workload_parameters_as_form_query_or_json(client):
    token = await login(client)
    form = await new_workload(client, token, filter="blur", workload_name="by-form")
    assert (form["filter"], form["workload_name"]) == ("blur", "by-form")
    r = await client.post("/workloads?filter=blur&workload_name=by.query", headers=bearer(token))
    assert (await r.json())["workload_name"] == "by.query"
    r = await client.post("/workloads", headers=bearer(token),
                          json={"filter": "blur", "workload_name": "by_json"})
    body = await r.json()
    assert (body["filter"], body["workload_name"]) == ("blur", "by_json")
    got = await client.get(f"/workloads/{body['workload_id']}", headers=bearer(token))
    assert (await got.json()) == body


@pytest.mark.parametrize("params, words", [
    ({"filter": "posterize"}, ["unknown filter", "grayscale", "blur"]),
    ({"workload_name": "../etc"}, ["workload_name"]),
    ({"workload_name": "a b"}, ["workload_name"]),
    ({"workload_name": "x" * 65}, ["workload_name"]),
    ({"workload_name": ".."}, ["workload_name"]),
])
async def test_bad_workload_parameters_are_400(client, params, words):
    token = await login(client)
    r = await client.post("/workloads", headers=bearer(token), data=params)
    await assert_error(r, 400, *words)


async def test_deeply_nested_json_body_is_400(client):
    token = await login(client)
    body = '{"filter": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = await client.post("/workloads", headers={**bearer(token), "Content-Type": "application/json"}, data=body)
    await assert_error(r, 400, "malformed JSON body")


async def test_malformed_json_body_is_400(client):
    token = await login(client)
    r = await client.post("/workloads", data=b"{not json",
                          headers={**bearer(token), "Content-Type": "application/json"})
    await assert_error(r, 400, "JSON")


async def test_workload_name_in_use_is_409(client):
    token = await login(client)
    await new_workload(client, token, workload_name="frames")
    r = await client.post("/workloads", headers=bearer(token), data={"workload_name": "frames"})
    await assert_error(r, 409, "frames")


async def test_list_workloads_shows_only_the_callers(client):
    token = await login(client)
    mine = [await new_workload(client, token, workload_name=n) for n in ("one", "two")]
    await client.app[AUTH].add_user("bob", "bobpw")
    await new_workload(client, await login(client, "bob", "bobpw"))
    r = await client.get("/workloads", headers=bearer(token))
    assert r.status == 200 and await r.json() == mine[::-1]  # newest first
    assert r.headers["X-Total-Count"] == "2" and "Link" not in r.headers


async def test_the_workload_list_is_paginated_newest_first(client):
    token = await login(client)
    made = [(await new_workload(client, token))["workload_id"] for _ in range(5)]
    seen, url, pages = [], "/workloads?limit=2", 0
    while url:
        r = await client.get(url, headers=bearer(token))
        assert r.status == 200 and r.headers["X-Total-Count"] == "5"
        seen += [w["workload_id"] for w in await r.json()]
        link = r.headers.get("Link")
        url = link[1:link.index(">")] if link else ""
        pages += 1
    assert seen == made[::-1] and pages == 3
    await assert_error(await client.get("/workloads?limit=5000", headers=bearer(token)), 400, "at most 1000")


async def test_unknown_and_foreign_workloads_are_404(client):
    token = await login(client)
    await assert_error(await client.get("/workloads/nope", headers=bearer(token)), 404, "not found")
    mine = await new_workload(client, token)
    await client.app[AUTH].add_user("bob", "bobpw")
    bob = await login(client, "bob", "bobpw")
    r = await client.get(f"/workloads/{mine['workload_id']}", headers=bearer(bob))
    await assert_error(r, 404, "not found")


# -- images ---------------------------------------------------------------------------------

async def test_upload_assigns_ids_in_arrival_order_and_keeps_bytes(client):
    token = await login(client)
    w = await new_workload(client, token, workload_name="shots")
    blobs = [png_bytes(10 + i, 8) for i in range(3)]
    for i, data in enumerate(blobs):
        r = await upload(client, token, w["workload_id"], data, field=("data", "image", "file")[i])
        assert r.status == 200, await r.text()
        assert await r.json() == {"workload_id": w["workload_id"], "image_id": i, "type": "original"}
    for i, data in enumerate(blobs):
        r = await client.get(f"/images/{i}", headers=bearer(token),
                             params={"workload_id": w["workload_id"], "type": "original"})
        assert r.status == 200 and r.content_type == "image/png"
        assert await r.read() == data
    listing = await client.get("/images", headers=bearer(token), params={"workload_id": w["workload_id"]})
    assert await listing.json() == [
        {"image_id": i, "type": "original", "workload_id": w["workload_id"], "size": len(blobs[i]), "format": "PNG",
         "filename": "17.png", "photo": None, "width": 10 + i, "height": 8}
        for i in range(3)
    ]
    view = await (await client.get(f"/workloads/{w['workload_id']}", headers=bearer(token))).json()
    assert view["images"] == 3 and view["status"] == "scheduling"  # no worker in this test


async def test_upload_may_choose_its_id_to_keep_an_order(client):
    """What `dpip push --jobs K` relies on: parallel uploads land at the ids their names give."""
    token = await login(client)
    w = await new_workload(client, token)
    for i in (2, 0):
        r = await upload(client, token, w["workload_id"], png_bytes(colour=(i, 0, 0)), extra={"image_id": str(i)})
        assert (await r.json())["image_id"] == i
    view = await (await client.get(f"/workloads/{w['workload_id']}", headers=bearer(token))).json()
    assert view["images"] == 2 and view["status"] == "scheduling"
    r = await upload(client, token, w["workload_id"], png_bytes(), extra={"image_id": "2"})
    await assert_error(r, 409, "image 2", "already exists")
    r = await upload(client, token, w["workload_id"], png_bytes())  # no id: after the highest
    assert (await r.json())["image_id"] == 3
    for bad, words in (("-1", "negative"), ("x", "integer"), (str(2**31), "at most")):
        await assert_error(await upload(client, token, w["workload_id"], png_bytes(), extra={"image_id": bad}),
                           400, *words.split())
    r = await client.get("/images/2", headers=bearer(token), params={"workload_id": w["workload_id"]})
    assert await r.read() == png_bytes(colour=(2, 0, 0))


async def test_workload_meta_round_trips(client):
    token = await login(client)
    meta = {"video": {"fps": "30000/1001", "width": 1280}}
    r = await client.post("/workloads", headers=bearer(token), json={"filter": "blur", "meta": meta})
    w = await r.json()
    assert w["meta"] == meta
    got = await (await client.get(f"/workloads/{w['workload_id']}", headers=bearer(token))).json()
    assert got["meta"] == meta
    assert (await new_workload(client, token))["meta"] == {}
    deep = "[" * 2000 + "]" * 2000  # under 4 KiB, deeper than the JSON parser's recursion
    for bad, words in (("[1]", "object"), ("{", "JSON"), ('{"a": "' + "x" * 5000 + '"}', "larger"),
                       ('{"fps": NaN}', "NaN"), ('{"a": ' + deep + "}", "JSON")):
        r = await client.post("/workloads", headers=bearer(token), data={"meta": bad})
        await assert_error(r, 400, "meta", words)


async def test_download_parameters_in_a_form_body_on_a_get(client):
    token = await login(client)
    w = await new_workload(client, token)
    data = png_bytes()
    assert (await upload(client, token, w["workload_id"], data)).status == 200
    r = await client.get("/images/0", headers={**bearer(token), "Content-Type": "application/x-www-form-urlencoded"},
                         data=f"workload_id={w['workload_id']}&type=original")
    assert r.status == 200 and await r.read() == data


@pytest.mark.parametrize("data, status, words", [
    (b"this is not an image, just text", 400, ["not an image"]),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, ["broken header"]),
    (b"", 400, ["empty"]),
])
async def test_upload_of_a_non_image_is_rejected(client, data, status, words):
    token = await login(client)
    w = await new_workload(client, token)
    await assert_error(await upload(client, token, w["workload_id"], data), status, *words)
    view = await (await client.get(f"/workloads/{w['workload_id']}", headers=bearer(token))).json()
    assert view["images"] == 0
    # Nothing half-written is left behind.
    assert list((client.app[STORE].path.parent / "incoming").iterdir()) == []


async def test_upload_errors(client):
    token = await login(client)
    w = await new_workload(client, token)
    r = await client.post("/images", headers=bearer(token), json={"workload_id": w["workload_id"]})
    await assert_error(r, 415, "multipart")
    body = f'--b\r\nContent-Disposition: form-data; name="workload_id"\r\n\r\n{w["workload_id"]}\r\n--b--\r\n'
    r = await client.post("/images", data=body.encode(),
                          headers={**bearer(token), "Content-Type": "multipart/form-data; boundary=b"})
    await assert_error(r, 400, "no image")
    r = await client.post("/images", data=b"--b\r\ngarbage",
                          headers={**bearer(token), "Content-Type": "multipart/form-data; boundary=b"})
    assert r.status == 400
    await assert_error(await upload(client, token, "nope", png_bytes()), 404, "not found")
    r = await upload(client, token, w["workload_id"], png_bytes(), type_="sideways")
    await assert_error(r, 400, "type")


async def test_upload_over_the_size_limit_is_413(aiohttp_client, settings):
    from dataclasses import replace

    from server.services import build_app

    client = await aiohttp_client(build_app(replace(settings, max_upload_bytes=1000)))
    token = await login(client)
    w = await new_workload(client, token)
    big = png_bytes(400, 400, mode="RGB", colour=(1, 2, 3)) + b"\x00" * 5000
    await assert_error(await upload(client, token, w["workload_id"], big), 413, "limit")


async def test_filtered_results_come_from_workers_only_and_first_wins(client):
    token = await login(client)
    w = await new_workload(client, token)
    wid = w["workload_id"]
    assert (await upload(client, token, wid, png_bytes())).status == 200
    r = await upload(client, token, wid, png_bytes(), type_="filtered", extra={"image_id": "0"})
    await assert_error(r, 403, "workers")
    wtoken = job_capability(client.app, "w1", wid, 0)
    await assert_error(await upload(client, wtoken, wid, png_bytes()), 403, "filtered")
    r = await upload(client, wtoken, wid, png_bytes(), type_="filtered", extra={"image_id": "5"})
    await assert_error(r, 404, "not found")  # not its job
    r = await upload(client, wtoken, wid, png_bytes(), type_="filtered", extra={"image_id": "0"})
    await assert_error(r, 400, "not grayscale")  # the workload asked for grayscale
    r = await upload(client, wtoken, wid, png_bytes(32, 32, colour=1, mode="L"), type_="filtered",
                     extra={"image_id": "0"})
    await assert_error(r, 400, "32x32 result for a 64x48 original")
    first, second = png_bytes(colour=1, mode="L"), png_bytes(colour=9, mode="L")
    for data in (first, second):  # a duplicate (e.g. a re-sent job) must not overwrite
        r = await upload(client, wtoken, wid, data, type_="filtered", extra={"image_id": "0"})
        assert r.status == 200, await r.text()
    r = await client.get("/images/0", headers=bearer(token), params={"workload_id": wid, "type": "filtered"})
    assert await r.read() == first
    view = await (await client.get(f"/workloads/{wid}", headers=bearer(token))).json()
    assert view["filtered_images"] == [0] and view["status"] == "completed"


async def test_download_errors(client):
    token = await login(client)
    w = await new_workload(client, token)
    wid = w["workload_id"]
    q = {"workload_id": wid}
    await assert_error(await client.get("/images/0", headers=bearer(token), params=q), 404, "not found")
    assert (await upload(client, token, wid, png_bytes())).status == 200
    r = await client.get("/images/0", headers=bearer(token), params={**q, "type": "filtered"})
    await assert_error(r, 404, "filtered image 0")
    await assert_error(await client.get("/images/abc", headers=bearer(token), params=q), 400, "integer")
    r = await client.get(f"/images/{10**20}", headers=bearer(token), params=q)  # beyond SQLite's integers
    await assert_error(r, 400, "at most")
    r = await client.get("/images/0", headers=bearer(token), params={**q, "size": "huge"})
    await assert_error(r, 400, "size must be one of")
    await assert_error(await client.get("/images/0", headers=bearer(token)), 400, "workload_id")
    r = await client.get("/images/0", headers=bearer(token), params={"workload_id": "nope"})
    await assert_error(r, 404, "not found")
    await assert_error(await client.get("/images", headers=bearer(token)), 400, "workload_id")


# -- status, routing ------------------------------------------------------------------------

async def test_status_lists_active_workloads_of_the_caller(client):
    token = await login(client)
    w = await new_workload(client, token)
    await client.app[AUTH].add_user("bob", "bobpw")
    bob = await login(client, "bob", "bobpw")
    await new_workload(client, bob)
    r = await client.get("/status", headers=bearer(token))
    body = await r.json()
    assert body["system_name"] == "DPIP" and body["server_time"].endswith("Z")
    assert [x["workload_id"] for x in body["active_workloads"]] == [w["workload_id"]]
    assert body["active_workloads"][0] == w
    assert body["workers"] == []


@pytest.mark.parametrize("method, path, allow", [
    ("PUT", "/status", "GET"),
    ("DELETE", "/workloads", "POST"),
    ("PATCH", "/images", "GET"),
    ("GET", "/logout", "DELETE"),
])
async def test_wrong_method_is_405_with_allow(client, method, path, allow):
    r = await client.request(method, path)
    body = await assert_error(r, 405, "not allowed")
    assert allow in r.headers["Allow"] and allow in body["error"]


async def test_unknown_route_is_json_404(client):
    await assert_error(await client.get("/no/such/thing"), 404, "no such endpoint")
