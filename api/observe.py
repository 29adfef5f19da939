"""Watching the system: the dashboard page, its live event stream, Prometheus metrics and the
OpenAPI description."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

from aiohttp import web

from api import metrics, openapi
from api.handlers import requires, servers_json, storage_json, workers_json, workload_summaries
from api.keys import (
    AUTH,
    AUTOSCALER,
    IMAGES,
    JOBS,
    MEMBERSHIP,
    METRICS,
    SCHEDULER,
    SETTINGS,
    STOPPING,
    STORE,
)
from api.params import bearer_token, client_address
from common import filters
from controller.auth import USER, is_loopback
from controller.models import DpipError

STATIC = Path(__file__).parent / "static"
EVENT_INTERVAL = 1.0  # seconds between looks for changes on /events
KEEPALIVE_INTERVAL = 15.0  # seconds of silence on /events before a keep-alive comment
#: (EVENT_INTERVAL, KEEPALIVE_INTERVAL) for this app, when set (tests shorten them)
EVENT_TIMING = web.AppKey("event_timing", tuple)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def favicon(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "favicon.svg", headers={"Content-Type": "image/svg+xml",
                                                             "Cache-Control": "public, max-age=86400"})


async def snapshot(request: web.Request) -> dict:
    return {
        "server_time": time.time(),
        "workers": workers_json(request.app),
        "workloads": await workload_summaries(request),
        "queued_jobs": request.app[SCHEDULER].queued(),
        "autoscale": request.app[AUTOSCALER].describe() if AUTOSCALER in request.app else None,
        "servers": [{k: v for k, v in server.items() if k in ("name", "alive", "leader", "this_server")}
                    for server in await servers_json(request.app)],
    }


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


class Feed:
    """What one /events connection last sent, and the difference of a new snapshot from it.

    Entries are compared by their JSON text, so an entry is resent exactly when what the client
    would read of it differs. Lists are diffed per entry, by key (a worker's name, a workload's
    id); each entry is encoded once per look, as the whole snapshot was."""

    LISTS = {"workers": "name", "workloads": "workload_id"}
    SCALARS = ("queued_jobs", "autoscale", "servers")

    def __init__(self) -> None:
        self.sent: dict[str, dict[str, str]] = {}  # list -> {key: entry's JSON}, in the snapshot's order
        self.scalars: dict[str, str] = {}  # scalar -> its JSON

    def first(self, snap: dict) -> str:
        """The ``snapshot`` event's data: the whole snapshot."""
        self.sent = {name: _encoded(snap[name], key) for name, key in self.LISTS.items()}
        self.scalars = {name: _dumps(snap[name]) for name in self.SCALARS}
        return _dumps(snap)

    def changes(self, snap: dict) -> str | None:
        """The ``changes`` event's data, or None when nothing but the time changed."""
        out: dict = {}
        for name, key in self.LISTS.items():
            encoded = _encoded(snap[name], key)
            diff = diff_entries(self.sent[name], encoded, snap[name], key)
            if diff is not None:
                out[name] = diff
            self.sent[name] = encoded
        for name in self.SCALARS:
            encoded_scalar = _dumps(snap[name])
            if encoded_scalar != self.scalars[name]:
                out[name] = snap[name]
            self.scalars[name] = encoded_scalar
        return _dumps({"server_time": snap["server_time"], **out}) if out else None


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


@requires(USER)
async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the whole snapshot of the workers and the caller's workloads first
    (``event: snapshot``), then, each second, only what changed in it (``event: changes``), or
    nothing (a keep-alive comment after a silence), until the client goes away or the server
    stops."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    stopping: asyncio.Event = request.app[STOPPING]
    interval, keepalive = request.app.get(EVENT_TIMING, (EVENT_INTERVAL, KEEPALIVE_INTERVAL))
    token = bearer_token(request)
    feed: Feed | None = None
    last_write = time.monotonic()
    try:
        while not stopping.is_set():
            try:  # a logout, an expiry or a removed user ends the stream too
                await request.app[AUTH].refresh_users()
                request.app[AUTH].verify(token, (USER,))
            except DpipError:
                break
            snap = await snapshot(request)
            if feed is None:
                feed = Feed()
                message: str | None = f"event: snapshot\ndata: {feed.first(snap)}\n\n"
            else:
                data = feed.changes(snap)
                message = f"event: changes\ndata: {data}\n\n" if data is not None else None
            if message is None and time.monotonic() - last_write >= keepalive:
                message = ": keep-alive\n\n"  # so that proxies keep a quiet connection
            if message is not None:
                await resp.write(message.encode())
                last_write = time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)
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
    """The filter registry, for the dashboard's form and for clients (public, like the API's
    description)."""
    return web.json_response([s.describe() for s in filters.REGISTRY.values()])


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi.spec(request.app[SETTINGS].public_url or None))


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
    r = app.router
    r.add_route("GET", "/", index)
    r.add_route("GET", "/favicon.ico", favicon)
    r.add_static("/static/", STATIC, append_version=False)
    r.add_route("GET", "/events", events)
    r.add_route("GET", "/metrics", metrics_endpoint)
    r.add_route("GET", "/openapi.json", openapi_json)
    r.add_route("GET", "/filters", filter_list)
