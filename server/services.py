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
import asyncio
import logging
import os
import shlex
import socket
import time
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
    PLANS,
    SCHEDULER,
    SETTINGS,
    STORE,
    WORKLOADS,
)
from api.ratelimit import LoginThrottle
from common.aio import stop_tasks
from common.models import DpipError
from controller.auth import Auth, system_join_token, system_secret
from controller.jobs import JobLifecycle
from controller.membership import Membership
from controller.workloads import Workloads
from filtering.pipeline import Plans
from plane import localjoin, wire
from plane.tls import ServerTls, nng_url
from scheduler.autoscale import Autoscaler, ScalePolicy
from scheduler.dispatcher import HedgePolicy, SchedulerSettings
from scheduler.leader import LeadingScheduler
from scheduler.provision import ExternalCommand, LocalProcesses, Provisioner
from server.settings import ServerSettings
from storage import engines
from storage.datastore import Datastore, as_shared
from storage.filestore import FileImageStore
from storage.images import ImageStore

logger = logging.getLogger(__name__)


SERVER_TLS = web.AppKey("server_tls", ServerTls)  # set when the server runs TLS


def build_app(settings: ServerSettings, tls: ServerTls | None = None) -> web.Application:
    """The whole server: the HTTP API with the services it serves, started and stopped with it
    (the API over HTTPS and the worker plane over TLS with ``tls``; see :mod:`plane.tls`)."""
    app = create_app(settings)
    if tls is not None:
        app[SERVER_TLS] = tls
    app.cleanup_ctx.extend([_datastore, _images, _membership, _scheduler, _presence, _retention, _autoscaler])
    return app


def open_datastore(s: ServerSettings) -> Datastore:
    """The datastore ``--database`` names (SQLite in the data dir by default)."""
    return engines.open_datastore(s.database, s.data_dir)


def open_image_store(s: ServerSettings) -> ImageStore:
    """The image store ``--image-store`` names (files in the data dir by default)."""
    if s.uses_s3:
        from storage.s3 import S3ImageStore
        return S3ImageStore(s.image_store, s.max_upload_bytes, s.max_pixels, s.redirect_downloads)
    return FileImageStore(s.images_dir, s.incoming_dir, s.max_upload_bytes, s.max_pixels, s.fsync)


async def before_stop(app: web.Application) -> None:
    """First step of a stop, while the API still serves: the workers the autoscaler started
    drain (their last results need the API) and leave."""
    if AUTOSCALER in app:
        await app[AUTOSCALER].close()


def _prepare_data_dir(s: ServerSettings) -> None:
    s.data_dir.mkdir(parents=True, exist_ok=True)
    s.data_dir.chmod(0o700)  # password hashes, the JWT secret, everyone's images: owner only
    if s.uses_sqlite:
        for db_file in s.db_path.parent.glob(s.db_path.name + "*"):  # made before 0700 and umask 077
            db_file.chmod(0o600)
    if s.uses_s3:
        return  # no image byte on this disk
    s.images_dir.mkdir(parents=True, exist_ok=True)
    s.incoming_dir.mkdir(parents=True, exist_ok=True)
    for leftover in s.incoming_dir.glob("*.upload"):  # uploads cut off by a crash: never accepted
        leftover.unlink()


async def _datastore(app: web.Application) -> AsyncIterator[None]:
    """The datastore, and what lives on it: users and tokens."""
    s = app[SETTINGS]
    _prepare_data_dir(s)
    store = open_datastore(s)
    await store.open()
    try:
        auth = Auth(store, await system_secret(store, s.data_dir), s.token_ttl)
        await auth.load()
        await auth.bootstrap_admin(s.data_dir, s.admin_user, s.admin_password)
        app[STORE], app[AUTH] = store, auth
        metrics = app.get(METRICS)
        app[LOGIN_LIMITS] = LoginThrottle(s.login_failures, 60.0, account_delay=s.login_slowdown,
                                          on_slowed=metrics.logins_slowed.inc if metrics is not None else lambda: None)
        yield
    finally:
        await store.close()


async def _images(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    images = open_image_store(s)
    await images.open()
    app[IMAGES] = images
    app[JOBS] = JobLifecycle(app[STORE], images)  # the one home of a job's transitions
    redone = await app[JOBS].redo_lost_results()
    if redone:
        logger.warning("%d result(s) recorded just before the last stop were not on disk: their jobs run again",
                       redone)
    try:
        yield
    finally:
        await images.close()


JOIN_TOKEN = web.AppKey("join_token", str)  # the one in force (given, saved, or none)


async def _membership(app: web.Application) -> AsyncIterator[None]:
    """The controller's socket: workers join and heartbeat here."""
    s = app[SETTINGS]
    ttl = s.worker_ttl or 3 * s.heartbeat_interval
    join_token = app[JOIN_TOKEN] = await system_join_token(app[STORE], s.data_dir, s.join_token, required=True)
    tls = app.get(SERVER_TLS)
    membership = Membership(app[STORE], app[AUTH].secret, s.port, s.public_url, s.heartbeat_interval, ttl,
                            join_token, forget_after=s.forget_after, max_workers=s.max_workers, tls=tls,
                            limits=s.limits)
    app[MEMBERSHIP] = membership
    app[PLANS] = Plans(membership.catalog.declaration, s.limits)
    app[JOBS].declarations = membership.catalog.of_worker  # results judged by their worker's declarations
    try:
        await membership.start(nng_url(s.host, s.controller_port, tls is not None))
        # Workers on this machine find the token by themselves (the course's command line has
        # no flag for it); those elsewhere are given it.
        if localjoin.publish(s.controller_port, join_token) is None:
            logger.warning("workers on this machine need DPIP_JOIN_TOKEN too (in %s)", s.data_dir / "join-token")
        yield
    finally:
        localjoin.withdraw(s.controller_port, join_token)
        await membership.close()


async def _scheduler(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    scheduler = LeadingScheduler(app[JOBS], app[MEMBERSHIP], SchedulerSettings(
        job_timeout=s.job_timeout,
        max_attempts=s.max_attempts,
        hedge=HedgePolicy(s.hedge),
        hedge_quantile=s.hedge_quantile,
        hedge_floor=s.hedge_floor_ms / 1000,
        hedge_initial=s.hedge_initial_ms / 1000,
        inline_max_bytes=s.inline_max_bytes,
    ), s.name(), s.lease_ttl, shared=as_shared(app[STORE]))
    scheduler.on_job_done = app[METRICS].job_done
    app[SCHEDULER] = scheduler
    if not app[IMAGES].direct:  # originals that travel with their jobs leave as they are committed
        app[JOBS].send_early_bytes = min(s.inline_max_bytes, wire.INLINE_MAX_BYTES)
    app[WORKLOADS] = Workloads(app[STORE], app[JOBS], s.quota_bytes, drop_jobs=scheduler.drop_workload)
    try:
        await scheduler.start()
        yield
    finally:
        # The RPC sockets first, so that calls in flight end at once instead of being cancelled
        # while they wait on nng (see common.aio.stop_tasks); membership's own cleanup is later.
        await app[MEMBERSHIP].close()
        await scheduler.close()


#: How often a server says it is alive (in the datastore: the servers of /status).
PRESENCE_INTERVAL = 1.0


async def _presence(app: web.Application) -> AsyncIterator[None]:
    """This server in the datastore's list of servers, refreshed every second."""
    s, store = app[SETTINGS], app[STORE]
    started = time.time()
    host = s.host if s.host not in ("0.0.0.0", "::", "") else socket.getfqdn()
    api_url = s.public_url or f"{s.scheme}://{host}:{s.port}"

    async def seen() -> None:
        try:
            await store.server_seen(s.name(), api_url, f"{host}:{s.controller_port}", started)
        except DpipError as e:
            logger.warning("could not record this server as alive: %s", e)

    async def beat() -> None:
        while True:
            await asyncio.sleep(PRESENCE_INTERVAL)
            await seen()

    await seen()  # listed before the API answers
    await store.forget_servers(time.time() - 24 * 3600)
    task = asyncio.create_task(beat(), name="presence")
    try:
        yield
    finally:
        await stop_tasks([task])


#: Completed workloads past --retain-days are looked for every tenth of that period, at most
#: every ten minutes (and at least every second).
RETENTION_INTERVAL = 600.0


async def _retention(app: web.Application) -> AsyncIterator[None]:
    """With ``--retain-days N``: completed workloads created more than N days ago are removed
    (images and files too), a log line each; at start, then every ten minutes."""
    s = app[SETTINGS]
    if not s.retain_days:
        yield
        return

    async def sweep() -> None:
        while True:
            try:
                await app[WORKLOADS].remove_expired(time.time() - s.retain_days * 86400, s.retain_days)
            except DpipError as e:
                logger.warning("retention: %s", e)
            await asyncio.sleep(min(RETENTION_INTERVAL, max(1.0, s.retain_days * 86400 / 10)))

    task = asyncio.create_task(sweep(), name="retention")
    try:
        yield
    finally:
        await stop_tasks([task])


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


def _make_autoscaler(s: ServerSettings, join_token: str, scheduler: LeadingScheduler,
                     membership: Membership) -> Autoscaler:
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
