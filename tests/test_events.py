"""GET /events sends the whole snapshot once, then only its changes: per worker and per
workload, never the unchanged ones, nothing at all (but a keep-alive) when nothing changes.
Over real HTTP: the in-process app (with shortened intervals) and a real multi-process system."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from api import observe
from api.handlers import FEED_NEWEST
from api.keys import AUTH, CLAIMS
from api.observe import EVENT_HUB, EVENT_TIMING, EventHub, Feed, diff_entries
from server.services import build_app
from tests.helpers import (
    assert_error,
    bearer,
    login,
    new_workload,
    png,
    png_bytes,
    push,
    ref,
    until,
    upload,
    wait_completed,
    workload,
)

KEEP_ALIVE = ("comment", "keep-alive")


def parse(lines: list[str]) -> tuple[str, object]:
    """One SSE message (its lines, without the blank one): ("snapshot" | "changes", data) or
    ("comment", text)."""
    kind, data, comment = "message", [], None
    for line in lines:
        if line.startswith(":"):
            comment = line[1:].strip()
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
    if data:
        return kind, json.loads("\n".join(data))
    return "comment", comment


class EventLines:
    """Lines of an event stream in, one whole event out (the blank line ends it)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def feed(self, raw: bytes) -> tuple[str, object] | None:
        assert raw, "the stream ended"
        line = raw.decode().rstrip("\n")
        if line:
            self.lines.append(line)
            return None
        return parse(self.lines) if self.lines else None


def merge(snap: dict, changes: dict) -> None:
    """The documented merge, as a client does it (the dashboard's ``mergeList``)."""
    snap["server_time"] = changes["server_time"]
    for name, key in (("workers", "name"), ("workloads", "workload_id")):
        if name not in changes:
            continue
        diff = changes[name]
        fresh = {e[key]: e for e in diff["set"]}
        out = [fresh.pop(e[key], e) for e in snap[name] if e[key] not in diff["removed"]]
        out.extend(fresh.values())
        if "order" in diff:
            out.sort(key=lambda e: diff["order"].index(e[key]))
        snap[name] = out
    for name in ("queued_jobs", "autoscale"):
        if name in changes:
            snap[name] = changes[name]


def ids(entries: list[dict]) -> list[str]:
    return [e["workload_id"] for e in entries]


# -- the diff itself ------------------------------------------------------------------------

def _snap(workers: list[dict], workloads: list[dict], queued: int = 0, t: float = 1.0) -> dict:
    return {"server_time": t, "workers": workers, "workloads": workloads, "queued_jobs": queued, "autoscale": None,
            "servers": [{"name": "s", "alive": True, "leader": True, "this_server": True}]}


def _wl(i: str, done: int = 0) -> dict:
    return {"workload_id": i, "filtered": done, "failed": 0, "filtered_images": list(range(done))}


def test_feed_sends_only_what_changed():
    feed = Feed()
    first = json.loads(feed.first(_snap([{"name": "a", "cpu": 1}], [_wl("x"), _wl("y")])))
    assert first == _snap([{"name": "a", "cpu": 1}], [_wl("x"), _wl("y")])  # the whole snapshot
    assert feed.changes(_snap([{"name": "a", "cpu": 1}], [_wl("x"), _wl("y")], t=2.0)) is None  # only the time
    got = json.loads(feed.changes(_snap([{"name": "a", "cpu": 2}, {"name": "b", "cpu": 0}],
                                        [_wl("x"), _wl("y", 1)], queued=3, t=3.0)))
    assert got == {"server_time": 3.0, "queued_jobs": 3,
                   "workers": {"set": [{"name": "a", "cpu": 2}, {"name": "b", "cpu": 0}], "removed": []},
                   "workloads": {"set": [_wl("y", 1)], "removed": []}}
    got = json.loads(feed.changes(_snap([{"name": "b", "cpu": 0}], [_wl("y", 1), _wl("z")], queued=3, t=4.0)))
    assert got == {"server_time": 4.0, "workers": {"set": [], "removed": ["a"]},
                   "workloads": {"set": [_wl("z")], "removed": ["x"]}}


def test_order_is_sent_only_when_the_merge_would_not_give_it():
    old = {"b": "1", "c": "1"}
    # a new key last, a removed one: the merge gives the order
    assert diff_entries(old, {"c": "1", "d": "1"}, [{"k": "c"}, {"k": "d"}], "k") == {"set": [{"k": "d"}], "removed": ["b"]}
    # one back into the window, at the front (an old workload active again): the order comes too
    assert diff_entries(old, {"a": "1", "b": "1", "c": "1"}, [{"k": "a"}, {"k": "b"}, {"k": "c"}], "k") \
        == {"set": [{"k": "a"}], "removed": [], "order": ["a", "b", "c"]}
    assert diff_entries(old, dict(old), [{"k": "b"}, {"k": "c"}], "k") is None


# -- the in-process app, over HTTP, with short intervals --------------------------------------

@pytest.fixture
async def quick(aiohttp_client, settings):
    app = build_app(settings)
    app[EVENT_TIMING] = (0.05, 0.3)  # look every 50 ms, a keep-alive after 300 ms of silence
    return await aiohttp_client(app)


class AsyncStream:
    def __init__(self, resp) -> None:
        self.resp = resp

    async def next(self) -> tuple[str, object]:
        event = EventLines()
        while (got := event.feed(await asyncio.wait_for(self.resp.content.readline(), 30))) is None:
            pass
        return got


async def test_quiet_stream_sends_keep_alives_then_just_the_changed_workload(quick):
    token = await login(quick)
    first, second = (await new_workload(quick, token))["workload_id"], (await new_workload(quick, token))["workload_id"]
    resp = await quick.get("/events", headers=bearer(token))
    try:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        stream = AsyncStream(resp)
        kind, snap = await stream.next()
        assert kind == "snapshot"
        assert set(snap) == {"server_time", "workers", "workloads", "queued_jobs", "autoscale", "servers"}
        assert ids(snap["workloads"]) == [first, second] and snap["workers"] == [] and snap["queued_jobs"] == 0

        # nothing happens (no worker, nothing queued): no event at all, only keep-alives
        assert await stream.next() == KEEP_ALIVE
        assert await stream.next() == KEEP_ALIVE

        # a new workload: a change that carries it alone
        third = (await new_workload(quick, token))["workload_id"]
        kind, changes = await stream.next()
        assert kind == "changes" and set(changes) == {"server_time", "workloads"}
        assert ids(changes["workloads"]["set"]) == [third] and changes["workloads"]["removed"] == []
        assert "order" not in changes["workloads"]
        merge(snap, changes)

        # an image into the first: only that workload, and the queue, until both show it
        r = await upload(quick, token, first, png_bytes())
        assert r.status == 200, await r.text()
        seen: set[str] = set()
        while not (snap["queued_jobs"] == 1 and snap["workloads"][0]["images"] == 1):
            kind, changes = await stream.next()
            if kind == "comment":
                continue
            assert kind == "changes" and "workers" not in changes
            if "workloads" in changes:
                assert changes["workloads"]["removed"] == [] and "order" not in changes["workloads"]
                seen.update(ids(changes["workloads"]["set"]))
            merge(snap, changes)
        assert seen == {first}
        assert ids(snap["workloads"]) == [first, second, third]
    finally:
        resp.close()


async def test_stream_ends_when_the_server_stops(quick):
    token = await login(quick)
    resp = await quick.get("/events", headers=bearer(token))
    stream = AsyncStream(resp)
    assert (await stream.next())[0] == "snapshot"
    await quick.server.close()  # its shutdown sets the app's stopping event: the stream ends
    rest = await asyncio.wait_for(resp.content.read(), 30)
    assert b"data: " not in rest.replace(b": keep-alive", b"")
    resp.close()
    assert quick.app[EVENT_HUB].open_streams() == 0  # and its slot is free


# -- streams: capped, and one snapshot per user and tick however many -------------------------

def now(cond):
    """``cond`` as the awaitable condition ``until`` polls."""
    async def check():
        return cond()
    return check


async def open_stream(client, token: str) -> AsyncStream:
    """A stream that has sent its first snapshot."""
    resp = await client.get("/events", headers=bearer(token))
    assert resp.status == 200, await resp.text()
    stream = AsyncStream(resp)
    assert (await stream.next())[0] == "snapshot"
    return stream


async def add_user(client, name: str) -> str:
    await client.app[AUTH].add_user(name, f"{name}-password")
    return await login(client, name, f"{name}-password")


async def test_streams_are_capped_per_user_and_a_closed_one_frees_its_slot(quick):
    admin, bob = await login(quick), await add_user(quick, "bob")
    streams = [await open_stream(quick, admin) for _ in range(8)]
    try:
        r = await quick.get("/events", headers=bearer(admin))  # a 9th: refused before it starts
        assert r.status == 429  # (before reading: a stream's body never ends)
        await assert_error(r, 429, "too many event streams for this user", "8")
        assert int(r.headers["Retry-After"]) >= 1
        # Another user's stream and everyone's requests still answer.
        streams.append(await open_stream(quick, bob))
        r = await quick.get("/status", headers=bearer(admin))
        assert r.status == 200 and "workers" in await r.json()
        hub = quick.app[EVENT_HUB]
        assert (hub.open_streams("admin"), hub.open_streams("bob"), hub.open_streams()) == (8, 1, 9)

        streams.pop(0).resp.close()  # the client goes: its slot is free
        await until(now(lambda: hub.open_streams("admin") == 7), 30, "the closed stream's end")
        streams.append(await open_stream(quick, admin))
        assert hub.open_streams("admin") == 8
    finally:
        for s in streams:
            s.resp.close()


async def test_a_logout_ends_the_users_streams_and_frees_their_slots(quick):
    admin = await login(quick)
    streams = [await open_stream(quick, admin) for _ in range(8)]
    try:
        assert (await quick.delete("/logout", headers=bearer(admin))).status == 200
        for s in streams:  # each ends (a hang would time out)
            rest = await asyncio.wait_for(s.resp.content.read(), 30)
            assert b"data: " not in rest.replace(b": keep-alive", b"")
        await until(now(lambda: quick.app[EVENT_HUB].open_streams() == 0), 30, "the streams' slots freed")
        again = await login(quick)
        streams += [await open_stream(quick, again) for _ in range(8)]
    finally:
        for s in streams:
            s.resp.close()


@pytest.fixture
async def crowded(aiohttp_client, settings):
    """Room for 3 streams on the whole server."""
    app = build_app(settings)
    app[EVENT_TIMING] = (0.05, 0.3)
    app[EVENT_HUB] = EventHub(total=3)
    return await aiohttp_client(app)


async def test_streams_are_capped_in_total(crowded):
    admin, bob = await login(crowded), await add_user(crowded, "bob")
    streams = [await open_stream(crowded, admin), await open_stream(crowded, admin), await open_stream(crowded, bob)]
    try:
        r = await crowded.get("/events", headers=bearer(bob))
        assert r.status == 429
        await assert_error(r, 429, "too many event streams on this server")
        streams.pop().resp.close()
        await until(now(lambda: crowded.app[EVENT_HUB].open_streams() == 2), 30, "the closed stream's end")
        streams.append(await open_stream(crowded, bob))
    finally:
        for s in streams:
            s.resp.close()


@pytest.fixture
async def steady(aiohttp_client, settings):
    app = build_app(settings)
    app[EVENT_TIMING] = (0.1, 5.0)  # a look every 100 ms
    return await aiohttp_client(app)


async def test_streams_of_a_user_share_one_snapshot_per_tick(steady, monkeypatch):
    """6 streams of admin's and 3 of bob's: each user's workloads are read once a tick, the
    workers once a tick for everyone, and a change reaches a user's streams as one snapshot."""
    admin = [await login(steady) for _ in range(6)]  # a token per stream, to count its looks
    bob = [await add_user(steady, "bob"), *[await login(steady, "bob", "bob-password") for _ in range(2)]]
    await new_workload(steady, admin[0])
    calls = {"admin": 0, "bob": 0, "workers": 0}
    looks = {token: 0 for token in admin + bob}
    summaries, workers, verify = observe.workload_summaries, observe.workers_json, steady.app[AUTH].verify

    async def counted_summaries(request):
        calls[request[CLAIMS].subject] += 1
        return await summaries(request)

    def counted_workers(*args, **kwargs):
        calls["workers"] += 1
        return workers(*args, **kwargs)

    def counted_verify(token, scopes):
        if token in looks:
            looks[token] += 1
        return verify(token, scopes)

    monkeypatch.setattr(observe, "workload_summaries", counted_summaries)
    monkeypatch.setattr(observe, "workers_json", counted_workers)
    monkeypatch.setattr(steady.app[AUTH], "verify", counted_verify)
    streams = {token: await open_stream(steady, token) for token in admin + bob}
    try:
        for key in calls:
            calls[key] = 0
        for token in looks:
            looks[token] = 0
        await until(now(lambda: min(looks.values()) >= 20), 60, "20 looks of every stream")
        ticks = max(looks.values())  # each stream looks once a tick at most
        assert calls["admin"] <= 2 * ticks + 2, (calls, looks)  # once a tick; 6 streams per tick before
        assert calls["bob"] <= 2 * ticks + 2, (calls, looks)
        assert calls["workers"] <= 2 * ticks + 2, (calls, looks)  # for both users
        assert steady.app[EVENT_HUB].computed["admin"] >= 1

        # A new workload reaches all of admin's streams in the same snapshot (its one time).
        new = (await new_workload(steady, admin[0]))["workload_id"]
        times = set()
        for token in admin:
            while True:
                kind, changes = await streams[token].next()
                if kind == "changes" and new in ids(changes.get("workloads", {}).get("set", [])):
                    times.add(changes["server_time"])
                    break
        assert len(times) == 1, times
    finally:
        for s in streams.values():
            s.resp.close()


# -- a real system: real workers, real heartbeats -------------------------------------------

class Stream:
    def __init__(self, url: str, token: str) -> None:
        request = urllib.request.Request(f"{url}/events", headers={"Authorization": f"Bearer {token}"})
        self.resp = urllib.request.urlopen(request, timeout=30)
        assert self.resp.headers["Content-Type"] == "text/event-stream"

    def next(self) -> tuple[str, object]:
        event = EventLines()
        while (got := event.feed(self.resp.readline())) is None:
            pass
        return got

    def next_changes(self) -> dict:
        while True:
            kind, data = self.next()
            if kind == "changes":
                return data  # type: ignore[return-value]
            assert kind == "comment", kind

    def close(self) -> None:
        self.resp.close()


def test_real_system_sends_per_entry_changes_and_the_window(make_system):
    s = make_system()
    s.start_worker("ev-1")
    s.wait_workers({"ev-1"})
    token = s.login()
    done = workload(s.url, token)
    push(s, token, done, {0: png((200, 10, 10))})
    wait_completed(s.url, token, done)
    empty = [workload(s.url, token) for _ in range(FEED_NEWEST - 1)]  # active: no images

    stream = Stream(s.url, token)
    try:
        kind, snap = stream.next()
        assert kind == "snapshot"
        assert [w["name"] for w in snap["workers"]] == ["ev-1"] and snap["workers"][0]["alive"]
        assert ids(snap["workloads"]) == [done, *empty] and snap["workloads"][0]["filtered"] == 1

        # nothing happening but heartbeats: the worker's figures change, no workload does
        for _ in range(2):
            changes = stream.next_changes()
            assert set(changes) == {"server_time", "workers"}, changes
            assert [w["name"] for w in changes["workers"]["set"]] == ["ev-1"]
            merge(snap, changes)

        # a new workload, filtered: only it changes; the completed oldest falls out of the newest 100
        new = workload(s.url, token)
        push(s, token, new, {0: png((10, 200, 10))})
        removed, seen = [], set()
        while not (ids(snap["workloads"])[-1:] == [new] and snap["workloads"][-1]["status"] == "completed"):
            changes = stream.next_changes()
            if "workloads" in changes:
                seen.update(ids(changes["workloads"]["set"]))
                removed += changes["workloads"]["removed"]
                assert "order" not in changes["workloads"]
            merge(snap, changes)
        assert seen == {new} and removed == [done]
        assert ids(snap["workloads"]) == [*empty, new]

        # what the merges built is what a new connection's snapshot says (nothing moves now)
        again = Stream(s.url, token)
        try:
            kind, fresh = again.next()
        finally:
            again.close()
        assert kind == "snapshot" and fresh["workloads"] == snap["workloads"]

        # the oldest, active again (its new image waits: no worker left), comes back in front:
        # with the order, since the merge alone would put it last
        s.stop_worker("ev-1")
        push(s, token, done, {1: png((10, 10, 200))})
        while done not in ids(snap["workloads"]):
            changes = stream.next_changes()
            merge(snap, changes)
        assert ids(changes["workloads"]["set"]) == [done] and changes["workloads"]["removed"] == []
        assert changes["workloads"]["order"] == [done, *empty, new]
        assert ids(snap["workloads"]) == [done, *empty, new] and snap["workloads"][0]["images"] == 2
    finally:
        stream.close()
    assert ref.request(s.url, "GET", "/events").status == 401
