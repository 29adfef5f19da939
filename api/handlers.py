"""HTTP handlers: parse, call a service, return JSON. Domain errors become statuses in app.py."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import BodyPartReader, web

from api.keys import (
    AUTH,
    AUTOSCALER,
    CLAIMS,
    IMAGES,
    JOB_CLAIMS,
    JOBS,
    LOGIN_LIMITS,
    MEMBERSHIP,
    PLANS,
    SCHEDULER,
    SETTINGS,
    STORE,
    WORKLOADS,
)
from api.params import (
    MULTIPART_ERRORS,
    FieldBudget,
    basic_credentials,
    bearer_token,
    client_address,
    content_type,
    form_parts,
    int_param,
    request_params,
    required,
)
from common.models import (
    BadInput,
    Filter,
    Forbidden,
    ImageType,
    LoginFailed,
    NotFound,
    Unauthorized,
    UnsupportedMedia,
    WorkloadView,
    json_loads,
    quoted,
)
from controller import capability
from controller.auth import JOB, USER, Claims
from filtering import pipeline, registry
from imaging.formats import FORMATS
from storage.images import ReceivedImage, image_key
from storage.queries import DEFAULT_PAGE, MAX_PAGE

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FILE_FIELDS = ("data", "image", "file")
MAX_META_BYTES = 4096
MAX_IMAGE_ID = 2**31 - 1


def requires(*scopes: str) -> Callable[[Handler], Handler]:
    """Check the bearer token (signature, expiry, revocation, scope) before the handler runs.
    With ``JOB`` among the scopes, a worker's job capability is taken too (for its one job)."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def checked(request: web.Request) -> web.StreamResponse:
            token = bearer_token(request)
            if JOB in scopes and capability.is_capability(token):
                job = request.app[MEMBERSHIP].check_capability(token)
                request[JOB_CLAIMS] = job
                request[CLAIMS] = Claims(job.worker, JOB, "", job.expires_at)
            else:
                request[CLAIMS] = request.app[AUTH].verify(token, scopes)
            return await handler(request)

        return checked

    return wrap


def _workload_json(request: web.Request, view: WorkloadView) -> dict:
    w = view.workload
    return {**view.to_json(request.app[SCHEDULER].waiting.get(w.id)), "steps": pipeline.steps_json(w.filter.value, w.params)}


def _owner(claims: Claims) -> str | None:
    """Users see their own workloads; a job capability sees its own job's (checked by
    :func:`_job_image`)."""
    return claims.subject if claims.scope == USER else None


def _job_image(request: web.Request, workload_id: str, image_id: int, type_: ImageType,
               allowed: ImageType, thumbnail: bool = False) -> None:
    """A job capability reaches exactly its job's image of type ``allowed`` (the original to
    read, the result to write), never a thumbnail."""
    if request[CLAIMS].scope != JOB:
        return
    job = request[JOB_CLAIMS]
    if job.workload_id != workload_id or job.image_id != image_id or type_ != allowed or thumbnail:
        raise NotFound(f"{type_.value} image {image_id} of workload {quoted(workload_id)} not found")


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
    view = await request.app[STORE].view_of(request.match_info["workload_id"], _owner(request[CLAIMS]))
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


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(1 << 20):
        yield chunk


def _image_type(params: dict[str, str], default: ImageType | None) -> ImageType | None:
    raw = params.get("type", "").strip().lower()
    if not raw:
        return default
    try:
        return ImageType(raw)
    except ValueError as e:
        raise BadInput(f"type must be 'original' or 'filtered', got {quoted(raw)}") from e


@requires(USER, JOB)
async def upload_image(request: web.Request) -> web.Response:
    """Stream the file to disk (a small body: read whole, then written at once), then give it
    the next id of its workload and queue its job."""
    if content_type(request) != "multipart/form-data":
        raise UnsupportedMedia("upload as multipart/form-data with the image in field 'data'")
    images = request.app[IMAGES]
    params: dict[str, str] = dict(request.query)
    stored: ReceivedImage | None = None
    uploaded_as: str | None = None
    fields = FieldBudget()  # the other fields are held in memory: a few, small
    try:
        try:
            async for name, filename, content in form_parts(request):
                if name in FILE_FIELDS or (name not in params and filename):
                    if stored is not None:
                        raise BadInput("send one image per request")
                    uploaded_as = safe_filename(filename)
                    stored = await (images.receive_bytes(content) if isinstance(content, bytes)
                                    else images.receive(_part_chunks(content)))
                elif name:
                    params[name] = await fields.read(content, name)
        except MULTIPART_ERRORS as e:
            raise BadInput(f"malformed multipart body: {e}") from e
        if stored is None:
            raise BadInput("no image in the request: put the file in multipart field 'data'")
        return web.json_response(await _accept(request, params, stored, uploaded_as))
    finally:
        if stored is not None:
            await images.discard(stored)  # a no-op once the file was moved into place


def _etags(header: str) -> set[str]:
    """The entity tags of an ``If-None-Match`` header (weak ones compare as strong: RFC 9110)."""
    return {t.strip().removeprefix("W/") for t in header.split(",") if t.strip()}


def safe_filename(name: str | None) -> str | None:
    """The uploaded file's own name, as it may be listed and later written by a client: its
    last path component, printable, at most 255 characters; None if nothing is left."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip().lstrip(".")
    return base[:255] or None


async def _accept(request: web.Request, params: dict[str, str], stored: ReceivedImage,
                  uploaded_as: str | None = None) -> dict:
    app = request.app
    store, claims = app[STORE], request[CLAIMS]
    workload = await store.get_workload(required(params, "workload_id"), _owner(claims))
    type_ = _image_type(params, ImageType.ORIGINAL)
    if type_ == ImageType.ORIGINAL:
        if claims.scope != USER:
            raise Forbidden("workers upload filtered images only")
        problem = app[PLANS].problem(workload.filter.value, workload.params, stored.width, stored.height,
                                     stored.frames)
        if problem:
            raise BadInput(f"this image cannot go through the workload's pipeline: {problem}")
        await app[WORKLOADS].quota_allows(claims.subject, stored.size)
        # the CLI numbers frames itself to keep their order
        chosen = int_param(params, "image_id", required=False, maximum=MAX_IMAGE_ID)
        job = await app[JOBS].accept_original(workload, stored, chosen, uploaded_as, app[SETTINGS].quota_bytes)
        image_id = job.image_id
        app[SCHEDULER].submit(job)
    else:
        if claims.scope != JOB:
            raise Forbidden("only workers upload filtered images, with their job's capability")
        image_id = int_param(params, "image_id")
        assert image_id is not None
        _job_image(request, workload.id, image_id, type_, ImageType.FILTERED)
        await app[JOBS].accept_uploaded_result(workload, image_id, stored, request[JOB_CLAIMS].worker)
    return {"workload_id": workload.id, "image_id": image_id, "type": type_.value}


@requires(USER, JOB)
async def download_image(request: web.Request) -> web.StreamResponse:
    params = await request_params(request)
    image_id = int_param({"image_id": request.match_info["image_id"]}, "image_id")
    assert image_id is not None
    store = request.app[STORE]
    workload = await store.get_workload(required(params, "workload_id"), _owner(request[CLAIMS]))
    type_ = _image_type(params, ImageType.ORIGINAL)
    assert type_ is not None
    _job_image(request, workload.id, image_id, type_, ImageType.ORIGINAL, thumbnail=bool(params.get("size")))
    fmt, stored_size, stored_at = await store.image_record(workload.id, image_id, type_)
    size = params.get("size", "").strip().lower()
    # Stored images never change (ids are not reused, results are first-wins): a validator
    # from what identifies this one; a result may be kept for good, an original revalidated.
    etag = '"' + hashlib.sha256(f"{workload.id}/{type_.value}/{image_id}/{stored_size}/{stored_at!r}/{size}"
                                .encode()).hexdigest()[:32] + '"'
    cache = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"
             if type_ == ImageType.FILTERED else "private, no-cache"}
    if etag in _etags(request.headers.get("If-None-Match", "")):
        return web.Response(status=304, headers=cache)
    images = request.app[IMAGES]
    if size:
        key = await request.app[JOBS].thumbnail(workload, type_, image_id, fmt, size)
    else:
        key = image_key(workload.dir, type_, image_id, fmt)
    content_type = FORMATS[fmt][1]
    whole = request.method == "GET" and "Range" not in request.headers
    download = await images.download(key, content_type, whole)
    try:
        if request[CLAIMS].scope == JOB:  # a worker fetching its job's original through us
            request.app[JOBS].sent_to_worker(download)
        if download.url:  # --redirect-downloads: the object store serves it, for a short while
            raise web.HTTPTemporaryRedirect(download.url)
        if download.path is not None:
            return web.FileResponse(download.path, headers={"Content-Type": content_type, **cache})
        response = web.StreamResponse(headers={"Content-Type": content_type, **cache})
        if download.size is not None:
            response.content_length = download.size
        await response.prepare(request)
        if download.data is not None:
            await response.write(download.data)
        else:
            assert download.chunks is not None
            async for chunk in download.chunks:
                await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        download.release()


@requires(USER)
async def list_images(request: web.Request) -> web.Response:
    params = await request_params(request)
    store = request.app[STORE]
    workload = await store.get_workload(required(params, "workload_id"), _owner(request[CLAIMS]))
    return web.json_response(await store.list_images(workload.id, _image_type(params, None)))
