"""The app factory: ``create_app(settings)`` builds the whole server process.

The HTTP routes live here; the datastore, the image store, the controller's membership and
the scheduler are opened and closed in ``cleanup_ctx``, so tests and ``main.py`` start the
same thing. Errors of every kind leave as JSON ``{"error": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from api import handlers, observe
from api.keys import (
    AUTH,
    AUTOSCALER,
    IMAGES,
    JOBS,
    LOGIN_LIMITS,
    MEMBERSHIP,
    METRICS,
    SCHEDULER,
    SETTINGS,
    STOPPING,
    STORE,
    UPLOAD_LOCKS,
)
from api.metrics import Metrics
from api.ratelimit import LoginThrottle
from api.settings import ServerSettings
from common.config import tcp_url
from controller.auth import Auth, is_loopback, load_join_token, load_or_create_secret
from controller.images import ImageStore
from controller.jobs import JobLifecycle
from controller.membership import Membership
from controller.models import (
    BadInput,
    Conflict,
    DpipError,
    Forbidden,
    NotFound,
    TooLarge,
    TooManyRequests,
    Unauthorized,
    UnsupportedMedia,
    clipped,
)
from controller.store import Store
from scheduler.autoscale import Autoscaler, ScalePolicy
from scheduler.dispatcher import HedgePolicy, Scheduler, SchedulerSettings
from scheduler.provision import ExternalCommand, LocalProcesses, Provisioner

logger = logging.getLogger(__name__)

_STATUS = [
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (TooManyRequests, 429),
    (TooLarge, 413),
    (UnsupportedMedia, 415),
    (BadInput, 400),
]


#: A backstop: no error body grows with the input, whatever a message quotes.
MAX_ERROR_CHARS = 500


def error_response(status: int, message: str, headers: dict | None = None) -> web.Response:
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + "…"
    return web.json_response({"error": message}, status=status, headers=headers)


def _client_gone(request: web.Request) -> bool:
    """The client closed its connection (mid-body, typically): nothing to answer, nothing wrong."""
    return request.transport is None or request.transport.is_closing()


@web.middleware
async def fresh_users(request: web.Request, handler) -> web.StreamResponse:
    """Users removed by ``main.py users remove`` (another process) lose their tokens at once."""
    auth = request.app.get(AUTH)
    if auth is not None:
        await auth.refresh_users()
    return await handler(request)


@web.middleware
async def errors_as_json(request: web.Request, handler) -> web.StreamResponse:
    """Map domain errors and aiohttp's own HTTP errors to JSON; never leak a stack trace."""
    try:
        return await handler(request)
    except DpipError as e:
        status = next(code for cls, code in _STATUS if isinstance(e, cls)) if not type(e) is DpipError else 500
        headers = {"WWW-Authenticate": 'Bearer realm="dpip"'} if status == 401 else None
        if isinstance(e, TooManyRequests):
            headers = {"Retry-After": str(max(1, round(e.retry_after)))}
        return error_response(status, str(e), headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items() if k in ("Allow", "WWW-Authenticate", "Retry-After")}
        reason = {
            404: f"no such endpoint: {clipped(request.method)} {clipped(request.path)}",
            405: f"method {clipped(request.method)} not allowed on {clipped(request.path)};"
                 f" allowed: {e.headers.get('Allow', '')}",
            413: "request body too large",
        }.get(e.status, e.text or e.reason)
        return error_response(e.status, reason, headers)
    except ConnectionResetError as e:  # aiohttp's, when the client hangs up mid-body
        if not _client_gone(request):
            logger.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(500, "internal server error")
        logger.info("%s %s: the client %s closed the connection before sending its whole request (%s)",
                    request.method, request.path, request.remote, e)
        return error_response(400, "connection closed before the request was complete")
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal server error")


async def _services(app: web.Application) -> AsyncIterator[None]:
    """Open the datastore, auth, image store, controller and scheduler; close them in reverse."""
    s = app[SETTINGS]
    s.data_dir.mkdir(parents=True, exist_ok=True)
    s.data_dir.chmod(0o700)  # password hashes, the JWT secret, everyone's images: owner only
    for db_file in s.data_dir.glob(s.db_path.name + "*"):  # made before 0700 and umask 077
        db_file.chmod(0o600)
    s.images_dir.mkdir(exist_ok=True)
    s.incoming_dir.mkdir(exist_ok=True)
    for leftover in s.incoming_dir.glob("*.upload"):  # uploads cut off by a crash: never accepted
        leftover.unlink()
    store = Store(s.db_path)
    await store.open()
    secret = load_or_create_secret(s.data_dir / "jwt-secret")
    auth = Auth(store, secret, s.token_ttl)
    await auth.load()
    await auth.bootstrap_admin(s.data_dir, s.admin_user, s.admin_password)
    ttl = s.worker_ttl or 3 * s.heartbeat_interval
    join_token = s.join_token or load_join_token(s.data_dir, required=not is_loopback(s.host))
    membership = Membership(store, secret, s.port, s.public_url, s.heartbeat_interval, ttl, join_token,
                            forget_after=s.forget_after, max_workers=s.max_workers)
    jobs = JobLifecycle(store)
    scheduler = Scheduler(jobs, membership, SchedulerSettings(
        job_timeout=s.job_timeout,
        max_attempts=s.max_attempts,
        hedge=HedgePolicy(s.hedge),
        hedge_quantile=s.hedge_quantile,
        hedge_floor=s.hedge_floor_ms / 1000,
        hedge_initial=s.hedge_initial_ms / 1000,
    ))
    scheduler.on_job_done = app[METRICS].job_done
    app[STORE], app[AUTH], app[MEMBERSHIP], app[SCHEDULER], app[JOBS] = store, auth, membership, scheduler, jobs
    app[IMAGES] = ImageStore(s.images_dir, s.incoming_dir, s.max_upload_bytes, s.max_pixels, s.fsync)
    app[UPLOAD_LOCKS] = {}
    app[LOGIN_LIMITS] = LoginThrottle(s.login_failures, 60.0)
    await membership.start(tcp_url(s.host, s.controller_port))
    await scheduler.start()
    if s.autoscale is not None:
        app[AUTOSCALER] = autoscaler = _autoscaler(s, join_token, scheduler, membership)
        await autoscaler.start()
    try:
        yield
    finally:
        if AUTOSCALER in app:
            await app[AUTOSCALER].close()  # main.py did it already (before_stop); tests may not
        await membership.close()  # closes the RPC sockets, so calls in flight end at once
        await scheduler.close()
        await store.close()
        app[IMAGES].close()


def _autoscaler(s: ServerSettings, join_token: str, scheduler: Scheduler, membership: Membership) -> Autoscaler:
    assert s.autoscale is not None
    log_dir = s.data_dir / "autoscale"
    provisioner: Provisioner
    if s.scale_up_cmd:
        host = s.host if s.host not in ("0.0.0.0", "::", "") else socket.getfqdn()
        provisioner = ExternalCommand(s.scale_up_cmd, s.scale_down_cmd, f"{host}:{s.controller_port}", log_dir,
                                      join_token)
        tags = None  # whatever the operator's workers have
    else:
        env = {"DPIP_JOIN_TOKEN": join_token} if join_token else {}
        args = shlex.split(s.autoscale_worker_args)
        provisioner = LocalProcesses(f"127.0.0.1:{s.controller_port}", args, log_dir, env)
        tags = worker_tags(args)
    policy = ScalePolicy(minimum=s.autoscale[0], maximum=s.autoscale[1], idle_timeout=s.idle_timeout,
                         worker_capacity=os.cpu_count() or 1)
    return Autoscaler(policy, provisioner, scheduler, membership, tags)


def worker_tags(args: list[str]) -> frozenset[str]:
    """The ``--tags`` among worker flags."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tags", default="")
    known, _ = parser.parse_known_args(args)
    return frozenset(t.strip() for t in known.tags.split(",") if t.strip())


def create_app(settings: ServerSettings) -> web.Application:
    """The server: HTTP API plus, in its lifecycle, controller and scheduler."""
    app = web.Application(middlewares=[observe.count_requests, errors_as_json, fresh_users],
                          client_max_size=1024 * 1024)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[STOPPING] = asyncio.Event()
    app.on_shutdown.append(_stop_streams)
    app.cleanup_ctx.append(_services)
    r = app.router
    r.add_route("GET", "/login", handlers.login)
    r.add_route("POST", "/login", handlers.login)
    r.add_route("DELETE", "/logout", handlers.logout)
    r.add_route("GET", "/status", handlers.status)
    r.add_route("POST", "/workloads", handlers.create_workload)
    r.add_route("GET", "/workloads", handlers.list_workloads)
    r.add_route("GET", "/workloads/{workload_id}", handlers.get_workload)
    r.add_route("GET", "/workloads/{workload_id}/jobs", handlers.workload_jobs)
    r.add_route("POST", "/images", handlers.upload_image)
    r.add_route("GET", "/images", handlers.list_images)
    r.add_route("GET", "/images/{image_id}", handlers.download_image)
    observe.add_routes(app)
    return app


async def before_stop(app: web.Application) -> None:
    """First step of a stop, while the API still serves: the workers the autoscaler started
    drain (their last results need the API) and leave."""
    if AUTOSCALER in app:
        await app[AUTOSCALER].close()


async def _stop_streams(app: web.Application) -> None:
    """Event streams would hold a graceful stop for aiohttp's whole shutdown timeout."""
    app[STOPPING].set()
