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
from api.handlers import requires, workers_json, workload_summaries
from api.keys import (
    AUTH,
    AUTOSCALER,
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
EVENT_INTERVAL = 1.0  # seconds between snapshots on /events


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def snapshot(request: web.Request) -> dict:
    return {
        "server_time": time.time(),
        "workers": workers_json(request.app),
        "workloads": await workload_summaries(request),
        "queued_jobs": request.app[SCHEDULER].queued(),
        "autoscale": request.app[AUTOSCALER].describe() if AUTOSCALER in request.app else None,
    }


@requires(USER)
async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: a snapshot of the workers and the caller's workloads every second,
    until the client goes away or the server stops."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    stopping: asyncio.Event = request.app[STOPPING]
    token = bearer_token(request)
    try:
        while not stopping.is_set():
            try:  # a logout, an expiry or a removed user ends the stream too
                await request.app[AUTH].refresh_users()
                request.app[AUTH].verify(token, (USER,))
            except DpipError:
                break
            data = json.dumps(await snapshot(request), separators=(",", ":"))
            await resp.write(f"event: snapshot\ndata: {data}\n\n".encode())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), EVENT_INTERVAL)
    except ConnectionResetError:
        pass  # the page was closed
    return resp


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Open to loopback (a local Prometheus or curl); anyone else needs a user token. Behind a
    trusted proxy on this host, the client it forwarded counts, not the proxy."""
    if not is_loopback(client_address(request)):
        request.app[AUTH].verify(bearer_token(request), (USER,))
    app = request.app
    return metrics.response(await app[METRICS].render(app[STORE], app[SCHEDULER], app[MEMBERSHIP]))


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
    r.add_static("/static/", STATIC, append_version=False)
    r.add_route("GET", "/events", events)
    r.add_route("GET", "/metrics", metrics_endpoint)
    r.add_route("GET", "/openapi.json", openapi_json)
    r.add_route("GET", "/filters", filter_list)
