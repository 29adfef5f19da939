"""Watching the system: the dashboard page, its live event stream, Prometheus metrics and the
OpenAPI description."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from pathlib import Path

from aiohttp import web

from api import metrics, openapi
from api.handlers import (
    requires,
    servers_json,
    storage_json,
    workers_json,
    workload_summaries,
)
from api.keys import (
    AUTH,
    AUTOSCALER,
    CLAIMS,
    IMAGES,
    JOBS,
    MEMBERSHIP,
    METRICS,
    SCHEDULER,
    SETTINGS,
    STOPPING,
    STORE,
)
from api.net import is_loopback
from api.params import bearer_token, client_address
from common.models import DpipError, TooManyRequests
from controller.auth import USER
from filtering import registry

STATIC = Path(__file__).parent / "static"
EVENT_INTERVAL = 1.0  # seconds between looks for changes on /events
KEEPALIVE_INTERVAL = 15.0  # seconds of silence on /events before a keep-alive comment
#: /events streams open at once per user (a few tabs of the dashboard) and in all; each costs a
#: connection and a diff a second, the snapshot itself is shared per user
MAX_STREAMS_PER_USER = 8
MAX_STREAMS = 1000
STREAM_RETRY = 5.0  # seconds, the Retry-After of a stream refused for the cap
#: (EVENT_INTERVAL, KEEPALIVE_INTERVAL) for this app, when set (tests shorten them)
EVENT_TIMING = web.AppKey("event_timing", tuple)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def favicon(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "favicon.svg", headers={"Content-Type": "image/svg+xml",
                                                             "Cache-Control": "public, max-age=86400"})


class Look:
    """One snapshot for the streams that send it: its list entries and scalars each encoded once,
    and its difference from an earlier look computed once per earlier look, however many
    streams (in step, they all last sent the same look) send it."""

    _ids = itertools.count()

    def __init__(self, snap: dict, lists: dict[str, dict[str, str]] | None = None,
                 scalars: dict[str, str] | None = None) -> None:
        self.snap = snap
        #: list -> {key: entry's JSON}, in the snapshot's order; scalar -> its JSON
        self.lists = lists or {name: _encoded(snap[name], key) for name, key in Feed.LISTS.items()}
        self.scalars = scalars or {name: _dumps(snap[name]) for name in Feed.SCALARS}
        self.id = next(self._ids)
        self._text: str | None = None
        self._since: dict[int, str | None] = {}  # an earlier look's id -> the changes since it

    def text(self) -> str:
        """The whole snapshot's JSON."""
        if self._text is None:
            self._text = _dumps(self.snap)
        return self._text

    def changes_since(self, old: Look) -> str | None:
        """The ``changes`` event's data from ``old`` to this, or None when nothing but the time
        changed."""
        if old.id not in self._since:
            self._since[old.id] = self._changes_since(old)
        return self._since[old.id]

    def _changes_since(self, old: Look) -> str | None:
        out: dict = {}
        for name, key in Feed.LISTS.items():
            diff = diff_entries(old.lists[name], self.lists[name], self.snap[name], key)
            if diff is not None:
                out[name] = diff
        for name in Feed.SCALARS:
            if self.scalars[name] != old.scalars[name]:
                out[name] = self.snap[name]
        return _dumps({"server_time": self.snap["server_time"], **out}) if out else None


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


class Feed:
    """What one /events connection last sent, and the difference of a new snapshot from it.

    Entries are compared by their JSON text, so an entry is resent exactly when what the client
    would read of it differs. Lists are diffed per entry, by key (a worker's name, a workload's
    id); each entry is encoded once per look (a :class:`Look`, shared by the streams of a tick,
    or a plain snapshot dict)."""

    LISTS = {"workers": "name", "workloads": "workload_id"}
    SCALARS = ("queued_jobs", "autoscale", "servers")

    def __init__(self) -> None:
        self.last: Look | None = None  # what the client has

    def first(self, snap: dict | Look) -> str:
        """The ``snapshot`` event's data: the whole snapshot."""
        self.last = look = snap if isinstance(snap, Look) else Look(snap)
        return look.text()

    def changes(self, snap: dict | Look) -> str | None:
        """The ``changes`` event's data, or None when nothing but the time changed."""
        look = snap if isinstance(snap, Look) else Look(snap)
        assert self.last is not None, "first() comes first"
        data = look.changes_since(self.last)
        self.last = look
        return data


def _encoded(entries: list[dict], key: str) -> dict[str, str]:
    return {e[key]: _dumps(e) for e in entries}


def diff_entries(old: dict[str, str], new: dict[str, str], entries: list[dict], key: str) -> dict | None:
    """``{"set": [entries new or changed], "removed": [keys gone]}``, plus ``"order"`` (every key,
    in the new order) when merging does not give that order, or None when nothing changed.
    Merging: a set entry replaces its key's in place, or goes last if new; removed keys go.
    ``old`` and ``new``: key -> the entry's JSON, in the list's order; ``entries``: the new list."""
    changed = [e for e in entries if old.get(e[key]) != new[e[key]]]
    removed = [k for k in old if k not in new]
    merged = [k for k in old if k in new] + [k for k in new if k not in old]
    in_order = merged == list(new)
    if not changed and not removed and in_order:
        return None
    out: dict = {"set": changed, "removed": removed}
    if not in_order:
        out["order"] = list(new)
    return out


class EventHub:
    """The /events streams of this server: how many each user has open (``per_user`` at most,
    ``total`` in all), and each tick's snapshot, computed once for all of them: what every user
    sees (workers, queue, servers) once, each user's workloads once per user.

    A stream opens with a snapshot of its own (as of its request), then looks at the tick's
    shared one: ticks are the multiples of the interval, so that streams look at the same time."""

    def __init__(self, per_user: int = MAX_STREAMS_PER_USER, total: int = MAX_STREAMS) -> None:
        self.per_user = per_user
        self.total = total
        self.computed: dict[str, int] = {}  # user -> their workloads' summaries computed (for tests)
        self._streams: dict[str, int] = {}  # user -> streams open
        self._everyone: tuple[int, asyncio.Task] | None = None  # (tick, its shared part)
        self._looks: dict[str, tuple[int, asyncio.Task]] = {}  # user -> (tick, their look)
        self._tasks: set[asyncio.Task] = set()

    def open_streams(self, user: str | None = None) -> int:
        """Streams open, of ``user`` or of everyone."""
        return self._streams.get(user, 0) if user is not None else sum(self._streams.values())

    def join(self, user: str) -> None:
        """Take a stream's slot, or raise :class:`TooManyRequests` (before the stream starts)."""
        if self._streams.get(user, 0) >= self.per_user:
            raise TooManyRequests(f"too many event streams for this user ({self.per_user} open):"
                                  f" close one, then try again", STREAM_RETRY)
        if self.open_streams() >= self.total:
            raise TooManyRequests(f"too many event streams on this server ({self.total}): try again later",
                                  STREAM_RETRY)
        self._streams[user] = self._streams.get(user, 0) + 1

    def leave(self, user: str) -> None:
        """Free a stream's slot (whatever ended it)."""
        left = self._streams.pop(user, 1) - 1
        if left > 0:
            self._streams[user] = left
        else:
            self._looks.pop(user, None)
            self.computed.pop(user, None)

    async def fresh(self, request: web.Request) -> Look:
        """A snapshot for the caller as of now (a stream's first)."""
        return await self._look(request, await _everyone(request.app))

    async def look(self, request: web.Request, tick: int) -> Look:
        """The caller's snapshot of ``tick`` (or of a later one), computed by the first of their
        streams to ask, shared with the others."""
        user = request[CLAIMS].subject
        entry = self._looks.get(user)
        if entry is None or entry[0] < tick:  # no await before the entry is in: one computation
            entry = self._looks[user] = (tick, self._spawn(self._look_of_tick(request, tick)))
        return await asyncio.shield(entry[1])

    async def _look_of_tick(self, request: web.Request, tick: int) -> Look:
        return await self._look(request, await self._shared(request.app, tick))

    async def _shared(self, app: web.Application, tick: int) -> Look:
        if self._everyone is None or self._everyone[0] < tick:
            self._everyone = (tick, self._spawn(_everyone(app)))
        return await asyncio.shield(self._everyone[1])

    async def _look(self, request: web.Request, everyone: Look) -> Look:
        workloads = await workload_summaries(request)
        user = request[CLAIMS].subject
        self.computed[user] = self.computed.get(user, 0) + 1
        snap = {"server_time": time.time(), "workers": everyone.snap["workers"], "workloads": workloads,
                **{name: everyone.snap[name] for name in Feed.SCALARS}}
        return Look(snap, {"workers": everyone.lists["workers"], "workloads": _encoded(workloads, "workload_id")},
                    everyone.scalars)

    def _spawn(self, coro) -> asyncio.Task:
        """A computation that goes on if the stream that started it goes away (others await it)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: each stream that awaited it has it too

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _everyone(app: web.Application) -> Look:
    """What every user's snapshot shows alike: the workers, the queue, the autoscaler, the servers
    (a look of its own, without workloads, so that its entries are encoded once for all)."""
    snap = {
        "workers": workers_json(app),
        "workloads": [],
        "queued_jobs": app[SCHEDULER].queued(),
        "autoscale": app[AUTOSCALER].describe() if AUTOSCALER in app else None,
        "servers": [{k: v for k, v in server.items() if k in ("name", "alive", "leader", "this_server")}
                    for server in await servers_json(app)],
    }
    return Look(snap)


#: The app's streams and their shared snapshots.
EVENT_HUB = web.AppKey("event_hub", EventHub)


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


@requires(USER)
async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the whole snapshot of the workers and the caller's workloads first
    (``event: snapshot``), then, each second, only what changed in it (``event: changes``), or
    nothing (a keep-alive comment after a silence), until the client goes away, its token dies
    or the server stops. At most MAX_STREAMS_PER_USER per user (429 beyond)."""
    hub, user = request.app[EVENT_HUB], request[CLAIMS].subject
    hub.join(user)
    try:
        return await _stream(request, hub)
    finally:
        hub.leave(user)


async def _stream(request: web.Request, hub: EventHub) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    stopping: asyncio.Event = request.app[STOPPING]
    interval, keepalive = request.app.get(EVENT_TIMING, (EVENT_INTERVAL, KEEPALIVE_INTERVAL))
    loop = asyncio.get_running_loop()
    token = bearer_token(request)
    feed = Feed()
    tick: int | None = None  # the tick looked at next (None: the stream's own first snapshot)
    last_write = time.monotonic()
    try:
        while not stopping.is_set() and not _client_gone(request):
            try:  # a logout, an expiry or a removed user ends the stream too
                await request.app[AUTH].refresh_users()
                request.app[AUTH].verify(token, (USER,))
            except DpipError:
                break
            if tick is None:
                message: str | None = f"event: snapshot\ndata: {feed.first(await hub.fresh(request))}\n\n"
            else:
                data = feed.changes(await hub.look(request, tick))
                message = f"event: changes\ndata: {data}\n\n" if data is not None else None
            if message is None and time.monotonic() - last_write >= keepalive:
                message = ": keep-alive\n\n"  # so that proxies keep a quiet connection
            if message is not None:
                await resp.write(message.encode())
                last_write = time.monotonic()
            tick = int(loop.time() // interval) + 1  # the next, however late this one was
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), max(0.0, tick * interval - loop.time()))
    except ConnectionResetError:
        pass  # the page was closed
    return resp


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Open to loopback (a local Prometheus or curl); anyone else needs a user token. Behind a
    trusted proxy on this host, the client it forwarded counts, not the proxy."""
    if not is_loopback(client_address(request)):
        request.app[AUTH].verify(bearer_token(request), (USER,))
    app = request.app
    return metrics.response(await app[METRICS].render(app[STORE], app[SCHEDULER], app[MEMBERSHIP],
                                                      app[JOBS].traffic if JOBS in app else None,
                                                      storage_json(app) if IMAGES in app else None))


async def filter_list(request: web.Request) -> web.Response:
    """What the fleet offers: every filter of this server's registry and, with a user token,
    every one a live worker declared (at most MAX_FLEET_FILTERS names), with its parameters and
    how many live workers run it, and which (the first :data:`MAX_OFFERED_BY`). Without a token,
    the server's own filters only: an anonymous request costs the same whatever the fleet."""
    token = request.headers.get("Authorization", "")
    named = False
    if token:
        request.app[AUTH].verify(bearer_token(request), (USER,))  # a wrong token is a 401, as anywhere
        named = True
    return web.json_response(fleet_filters(request.app[MEMBERSHIP], named))


#: Workers listed per filter by GET /filters (the count says how many run it in all).
MAX_OFFERED_BY = 32


def fleet_filters(membership, named: bool) -> list[dict]:
    fleet = membership.catalog.fleet_filters()
    out = []
    for name in membership.catalog.filter_names() if named else registry.REGISTRY:
        runners = fleet.get(name, [])
        spec = registry.REGISTRY.get(name) or runners[0][1]
        entry = {**spec.describe(), "on_server": name in registry.REGISTRY, "workers": len(runners),
                 "gpu_workers": sum(1 for _, _, gpu in runners if gpu)}
        if named:
            entry["offered_by"] = [{"worker": w.name, "version": s.version, "gpu": gpu}
                                   for w, s, gpu in runners[:MAX_OFFERED_BY]]
        out.append(entry)
    return out


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi.spec(request.app[SETTINGS].public_url or None))


async def _close_hub(app: web.Application) -> None:
    await app[EVENT_HUB].close()


@web.middleware
async def count_requests(request: web.Request, handler) -> web.StreamResponse:
    """HTTP requests by route pattern, method and final status (outermost middleware)."""
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        request.app[METRICS].request(metrics.route_of(request), request.method, status)


def add_routes(app: web.Application) -> None:
    app[EVENT_HUB] = EventHub()
    app.on_cleanup.append(_close_hub)
    r = app.router
    r.add_route("GET", "/", index)
    r.add_route("GET", "/favicon.ico", favicon)
    r.add_static("/static/", STATIC, append_version=False)
    r.add_route("GET", "/events", events)
    r.add_route("GET", "/metrics", metrics_endpoint)
    r.add_route("GET", "/openapi.json", openapi_json)
    r.add_route("GET", "/filters", filter_list)
