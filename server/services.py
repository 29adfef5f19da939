"""The composition root: which services the server runs and how they are wired.

:func:`build_app` takes the HTTP application (:func:`api.app.create_app`, which knows nothing of
schedulers or nng) and adds one cleanup context per resource, in dependency order: datastore
(with auth and the job lifecycle), image store, membership (the controller's nng socket),
scheduler, autoscaler. aiohttp unwinds them in reverse, and if one fails to start (a port in
use, a broken data dir) it unwinds those that had started, when the runner is cleaned up
(``main.py`` always does).
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from api.app import create_app
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
    STORE,
)
from api.ratelimit import LoginThrottle
from common.config import tcp_url
from controller.auth import Auth, is_loopback, load_join_token, load_or_create_secret
from controller.images import ImageStore
from controller.jobs import JobLifecycle
from controller.membership import Membership
from controller.store import Store
from scheduler.autoscale import Autoscaler, ScalePolicy
from scheduler.dispatcher import HedgePolicy, Scheduler, SchedulerSettings
from scheduler.provision import ExternalCommand, LocalProcesses, Provisioner
from server.settings import ServerSettings


def build_app(settings: ServerSettings) -> web.Application:
    """The whole server: the HTTP API with the services it serves, started and stopped with it."""
    app = create_app(settings)
    app.cleanup_ctx.extend([_datastore, _images, _membership, _scheduler, _autoscaler])
    return app


async def before_stop(app: web.Application) -> None:
    """First step of a stop, while the API still serves: the workers the autoscaler started
    drain (their last results need the API) and leave."""
    if AUTOSCALER in app:
        await app[AUTOSCALER].close()


def _prepare_data_dir(s: ServerSettings) -> None:
    s.data_dir.mkdir(parents=True, exist_ok=True)
    s.data_dir.chmod(0o700)  # password hashes, the JWT secret, everyone's images: owner only
    for db_file in s.data_dir.glob(s.db_path.name + "*"):  # made before 0700 and umask 077
        db_file.chmod(0o600)
    s.images_dir.mkdir(exist_ok=True)
    s.incoming_dir.mkdir(exist_ok=True)
    for leftover in s.incoming_dir.glob("*.upload"):  # uploads cut off by a crash: never accepted
        leftover.unlink()


async def _datastore(app: web.Application) -> AsyncIterator[None]:
    """The datastore, and what lives on it: users and tokens."""
    s = app[SETTINGS]
    _prepare_data_dir(s)
    store = Store(s.db_path)
    await store.open()
    try:
        auth = Auth(store, load_or_create_secret(s.data_dir / "jwt-secret"), s.token_ttl)
        await auth.load()
        await auth.bootstrap_admin(s.data_dir, s.admin_user, s.admin_password)
        app[STORE], app[AUTH] = store, auth
        app[LOGIN_LIMITS] = LoginThrottle(s.login_failures, 60.0)
        yield
    finally:
        await store.close()


async def _images(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    images = app[IMAGES] = ImageStore(s.images_dir, s.incoming_dir, s.max_upload_bytes, s.max_pixels, s.fsync)
    app[JOBS] = JobLifecycle(app[STORE], images)  # the one home of a job's transitions
    try:
        yield
    finally:
        images.close()


JOIN_TOKEN = web.AppKey("join_token", str)  # the one in force (given, saved, or none)


async def _membership(app: web.Application) -> AsyncIterator[None]:
    """The controller's socket: workers join and heartbeat here."""
    s = app[SETTINGS]
    ttl = s.worker_ttl or 3 * s.heartbeat_interval
    join_token = app[JOIN_TOKEN] = s.join_token or load_join_token(s.data_dir, required=not is_loopback(s.host))
    membership = Membership(app[STORE], app[AUTH].secret, s.port, s.public_url, s.heartbeat_interval, ttl,
                            join_token, forget_after=s.forget_after, max_workers=s.max_workers)
    app[MEMBERSHIP] = membership
    try:
        await membership.start(tcp_url(s.host, s.controller_port))
        yield
    finally:
        await membership.close()


async def _scheduler(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    scheduler = Scheduler(app[JOBS], app[MEMBERSHIP], SchedulerSettings(
        job_timeout=s.job_timeout,
        max_attempts=s.max_attempts,
        hedge=HedgePolicy(s.hedge),
        hedge_quantile=s.hedge_quantile,
        hedge_floor=s.hedge_floor_ms / 1000,
        hedge_initial=s.hedge_initial_ms / 1000,
    ))
    scheduler.on_job_done = app[METRICS].job_done
    app[SCHEDULER] = scheduler
    try:
        await scheduler.start()
        yield
    finally:
        # The RPC sockets first, so that calls in flight end at once instead of being cancelled
        # while they wait on nng (see common.aio.stop_tasks); membership's own cleanup is later.
        await app[MEMBERSHIP].close()
        await scheduler.close()


async def _autoscaler(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    if s.autoscale is None:
        yield
        return
    autoscaler = app[AUTOSCALER] = _make_autoscaler(s, app[JOIN_TOKEN], app[SCHEDULER], app[MEMBERSHIP])
    try:
        await autoscaler.start()
        yield
    finally:
        await autoscaler.close()  # main.py did it already (before_stop); tests may not


def _make_autoscaler(s: ServerSettings, join_token: str, scheduler: Scheduler, membership: Membership) -> Autoscaler:
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
