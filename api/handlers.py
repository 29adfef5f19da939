"""HTTP handlers: parse, call a service, return JSON. Domain errors become statuses in app.py."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from api.keys import (
    AUTH,
    AUTOSCALER,
    CLAIMS,
    IMAGES,
    JOB_CLAIMS,
    JOBS,
    LOGIN_LIMITS,
    MEMBERSHIP,
    SCHEDULER,
    SETTINGS,
    STORE,
    WORKLOADS,
)
from api.params import (
    basic_credentials,
    bearer_token,
    client_address,
    int_param,
    request_params,
)
from common.models import (
    BadInput,
    Filter,
    LoginFailed,
    Unauthorized,
    WorkloadView,
    json_loads,
)
from controller import capability
from controller.auth import JOB, USER, Claims
from filtering import pipeline, registry
from storage.queries import DEFAULT_PAGE, MAX_PAGE

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_META_BYTES = 4096



def requires(*scopes: str) -> Callable[[Handler], Handler]:
    """Check the bearer token (signature, expiry, revocation, scope) before the handler runs.
    With ``JOB`` among the scopes, a worker's job capability is taken too (for its one job)."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def checked(request: web.Request) -> web.StreamResponse:
            token = bearer_token(request)
            if JOB in scopes and capability.is_capability(token):
                job = request.app[MEMBERSHIP].capabilities.check(token)
                request[JOB_CLAIMS] = job
                request[CLAIMS] = Claims(job.worker, JOB, "", job.expires_at)
            else:
                request[CLAIMS] = request.app[AUTH].verify(token, scopes)
            return await handler(request)

        return checked

    return wrap


def _workload_json(request: web.Request, view: WorkloadView) -> dict:
    w = view.workload
    if JOBS in request.app and (unwritten := request.app[JOBS].running_unwritten(w.id)):
        # jobs this server sent whose dispatch is counted only with their result (dispatch_later)
        view = dataclasses.replace(view, running_jobs=view.running_jobs + unwritten)
    return {**view.to_json(request.app[SCHEDULER].waiting.get(w.id)), "steps": pipeline.steps_json(w.filter.value, w.params)}


def _owner(claims: Claims) -> str | None:
    """Users see their own workloads; a job capability sees its own job's (checked by
    :func:`_job_image`)."""
    return claims.subject if claims.scope == USER else None


#: How long a place a user logged in from stays familiar (spared the account's login budget).
FAMILIAR_FOR = 30 * 86400.0


async def login(request: web.Request) -> web.Response:
    """Counted as a failed login from before the password is hashed until it proves right."""
    try:
        user, password = basic_credentials(request)
    except Unauthorized as e:
        raise LoginFailed(str(e)) from e
    throttle, store = request.app[LOGIN_LIMITS], request.app[STORE]

    async def familiar(place: str) -> bool:
        return await store.known_place(user, place, time.time() - FAMILIAR_FOR)

    async def unlocked() -> float:
        return await store.unlocked_at(user)

    attempt = await throttle.begin(user, client_address(request), familiar, unlocked)  # 429 when throttled
    ok = False
    try:
        token = await request.app[AUTH].login(user, password)
        ok = True
    except Unauthorized as e:
        raise LoginFailed(str(e)) from e
    finally:
        throttle.end(attempt, ok)
    await store.remember_place(user, attempt.group)  # a familiar place, on every server and after a restart
    return web.json_response({"user": user, "token": token})


@requires(USER)
async def logout(request: web.Request) -> web.Response:
    claims: Claims = request[CLAIMS]
    await request.app[AUTH].revoke(claims)
    return web.json_response({"logout_message": f"Bye {claims.subject}, your token has been revoked"})


#: The dashboard's live feed shows the caller's active workloads and this many of the newest.
FEED_NEWEST = 100


async def workload_summaries(request: web.Request) -> list[dict]:
    """The caller's active workloads and the newest others, oldest first, with counts (the
    dashboard's live feed): bounded, whatever the caller's history."""
    store, owner = request.app[STORE], request[CLAIMS].subject
    newest, _, _ = await store.workload_page(owner, FEED_NEWEST)
    views = {v.workload.id: v for v in [*await store.active_views(owner), *newest]}
    out = []
    for view in sorted(views.values(), key=lambda v: (v.workload.created_at, v.workload.id)):
        body = _workload_json(request, view)
        body["filtered"], body["failed"] = len(view.filtered_images), len(view.failed_images)
        out.append(body)
    return out


@requires(USER)
async def status(request: web.Request) -> web.Response:
    active = [_workload_json(request, v) for v in await request.app[STORE].active_views(request[CLAIMS].subject)]
    app = request.app
    return web.json_response({
        "system_name": app[SETTINGS].system_name,
        "server_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "active_workloads": active,
        "workers": workers_json(app, admin=request[CLAIMS].subject == app[SETTINGS].admin_user),
        "servers": await servers_json(app),
        "storage": storage_json(app),
        "queued_jobs": app[SCHEDULER].queued(),
        "scheduler": app[SCHEDULER].describe(),
        "worker_plane": app[MEMBERSHIP].plane.as_json(),
        "autoscale": app[AUTOSCALER].describe() if AUTOSCALER in app else None,
    })


def storage_json(app: web.Application) -> dict:
    """Free and total bytes where images and the datastore are kept (None where this server
    cannot know: an object store, a database server)."""
    def of(space: tuple[int, int] | None) -> dict | None:
        return {"free_bytes": space[0], "total_bytes": space[1]} if space else None
    return {"images": of(app[IMAGES].space()), "datastore": of(app[STORE].space())}


#: A server silent this long is shown as not alive.
SERVER_TTL = 5.0


async def servers_json(app: web.Application) -> list[dict]:
    """The servers of the system (one, unless several share a database) and which schedules."""
    leader = await app[SCHEDULER].leader_name()
    me, now = app[SETTINGS].name(), time.time()
    return [{"name": r["name"], "api_url": r["api_url"], "alive": now - r["last_seen"] < SERVER_TTL,
             "leader": r["name"] == leader, "this_server": r["name"] == me, "last_seen": r["last_seen"],
             "started_at": r["started_at"]}
            for r in await app[STORE].servers()]


def workers_json(app: web.Application, admin: bool = False) -> list[dict]:
    """Every known worker by name, marked if the autoscaler started it; where to reach it
    (its RPC address) only for the admin."""
    scaler = app.get(AUTOSCALER)
    return [{**w.to_json(admin), "autoscaled": scaler is not None and scaler.is_managed(w.name)}
            for w in sorted(app[MEMBERSHIP].snapshot(), key=lambda w: w.name)]


@requires(USER)
async def create_workload(request: web.Request) -> web.Response:
    params = await request_params(request)
    chosen = pipeline_of(params, request.app[MEMBERSHIP], request.app[SETTINGS].limits)
    filter_, filter_params = chosen.stored()
    workload = await request.app[WORKLOADS].create(
        request[CLAIMS].subject, Filter(filter_), params.get("workload_name", "").strip() or None,
        params.get("tags", ""), _meta(params.get("meta", "")), filter_params)
    return web.json_response(_workload_json(request, await request.app[STORE].workload_view(workload)))


#: A workload's own fields: never read as a filter's parameter, whatever a plugin names its own.
RESERVED = frozenset({"filter", "workload_name", "tags", "meta"})


def pipeline_of(params: dict[str, str], membership, limits: pipeline.Limits | None = None) -> pipeline.Pipeline:
    """The workload's filter (grayscale by default): one filter, its parameters given beside it
    as the course's form does (``filter=blur&radius=5``) or inside it, or a pipeline of steps;
    each step checked against the filter's declaration (this server's, or a live worker's).
    Anything wrong is a 400 naming the step, before anything is created."""
    catalog = membership.catalog.declaration
    steps = pipeline.parse(params.get("filter", "").strip() or registry.DEFAULT)
    beside = sorted(n for n in registry.param_names() if params.get(n, ""))
    if len(steps) == 1 and not steps[0][1]:
        name = steps[0][0]
        spec = catalog(name)
        own = {p.name for p in spec.params} if spec is not None else set()
        foreign = [n for n in beside if n not in own]
        if foreign:
            raise BadInput(f"filter {name} takes no parameter {foreign[0]!r}")
        steps = [(name, {n: params[n] for n in own - RESERVED if n in params})]
    else:
        # A step's parameter beside a pipeline (or beside a filter given its own): it would be
        # ignored, so it is refused, as the course's form refuses one of another filter.
        named = {p.name for n, _ in steps if (spec := catalog(n)) is not None for p in spec.params} - RESERVED
        beside = sorted({*beside, *(n for n in named if params.get(n, ""))})
        if beside:
            raise BadInput(f"give each step's parameters inside it, e.g. step({beside[0]}=...), not {beside[0]}"
                           " beside the filter")
    return pipeline.validate(steps, catalog, membership.catalog.filter_names, limits, membership.catalog.all_declarations)


def _meta(raw: str) -> dict:
    """A small JSON object the client keeps with its workload (the CLI: a video's frame rate)."""
    if not raw.strip():
        return {}
    if len(raw.encode()) > MAX_META_BYTES:
        raise BadInput(f"meta is larger than {MAX_META_BYTES} bytes")
    try:
        meta = json_loads(raw)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise BadInput(f"meta is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise BadInput("meta must be a JSON object")
    return meta


@requires(USER)
async def list_workloads(request: web.Request) -> web.Response:
    """A page of the caller's workloads, newest first (``?limit=`` up to 1000, 100 by default;
    ``?after=<workload_id>`` for the next page). ``X-Total-Count`` says how many there are, and
    a ``Link: <...>; rel="next"`` header where the next page is."""
    params = await request_params(request)
    limit = int_param(params, "limit", required=False, maximum=MAX_PAGE) or DEFAULT_PAGE
    after = params.get("after", "").strip() or None
    views, total, next_after = await request.app[STORE].workload_page(request[CLAIMS].subject, limit, after)
    headers = {"X-Total-Count": str(total)}
    if next_after is not None:
        headers["Link"] = f'</workloads?limit={limit}&after={next_after}>; rel="next"'
    return web.json_response([_workload_json(request, v) for v in views], headers=headers)


@requires(USER)
async def get_workload(request: web.Request) -> web.Response:
    """The workload's view, with every result this server had received when asked (those being
    recorded are waited for, briefly: a client polling for its image sees the result the worker
    already sent)."""
    workload_id = request.match_info["workload_id"]
    if JOBS in request.app:
        await request.app[WORKLOADS].get(workload_id, _owner(request[CLAIMS]))  # (someone else's: 404 now)
        await request.app[JOBS].landed(workload_id)
    view = await request.app[STORE].view_of(workload_id, _owner(request[CLAIMS]))
    return web.json_response(_workload_json(request, view))


@requires(USER)
async def delete_workload(request: web.Request) -> web.Response:
    """The caller's workload, its jobs, images and thumbnails, files too (anyone else: 404)."""
    removed = await request.app[WORKLOADS].delete(request.match_info["workload_id"], request[CLAIMS].subject)
    logger.info("workload %s (%s) of %s deleted: %d images, %d results, %d files, %d bytes",
                removed["workload_id"], removed["workload_name"], request[CLAIMS].subject, removed["images"],
                removed["filtered_images"], removed["files"], removed["bytes"])
    return web.json_response({"deleted": True, **removed})


@requires(USER)
async def workload_jobs(request: web.Request) -> web.Response:
    """Per image: state, attempts, copies sent, the winning worker and where the time went."""
    store = request.app[STORE]
    workload = await store.get_workload(request.match_info["workload_id"], _owner(request[CLAIMS]))
    return web.json_response(await store.job_timings(workload.id))
