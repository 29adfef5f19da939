"""The image endpoints: ``POST /images`` (an original from a user, a result from a worker with
its job's capability), ``GET /images/{id}`` (bytes, a thumbnail, a redirect to the object store)
and ``GET /images`` (a workload's list)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator

from aiohttp import BodyPartReader, web

from api.keys import (
    CLAIMS,
    IMAGES,
    JOB_CLAIMS,
    JOBS,
    PLANS,
    SCHEDULER,
    SETTINGS,
    STORE,
    WORKLOADS,
)
from api.params import (
    MULTIPART_ERRORS,
    FieldBudget,
    content_type,
    form_parts,
    int_param,
    request_params,
    required,
)
from common.models import (
    BadInput,
    Forbidden,
    ImageType,
    NotFound,
    UnsupportedMedia,
    quoted,
)
from controller.auth import JOB, USER
from imaging.formats import FORMATS
from storage.images import ReceivedImage, image_key

from api.handlers import _owner, requires

logger = logging.getLogger(__name__)

#: The multipart fields an image may come in (the course's clients use ``data``).
FILE_FIELDS = ("data", "image", "file")
MAX_IMAGE_ID = 2**31 - 1


def _job_image(request: web.Request, workload_id: str, image_id: int, type_: ImageType,
               allowed: ImageType, thumbnail: bool = False) -> None:
    """A job capability reaches exactly its job's image of type ``allowed`` (the original to
    read, the result to write), never a thumbnail."""
    if request[CLAIMS].scope != JOB:
        return
    job = request[JOB_CLAIMS]
    if job.workload_id != workload_id or job.image_id != image_id or type_ != allowed or thumbnail:
        raise NotFound(f"{type_.value} image {image_id} of workload {quoted(workload_id)} not found")


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
    claims = request[CLAIMS]
    workload = await app[WORKLOADS].get(required(params, "workload_id"), _owner(claims))
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
        job = await app[JOBS].accept_original(workload, stored, chosen, uploaded_as, app[SETTINGS].quota_bytes,
                                              send=app[SCHEDULER].submit)
        image_id = job.image_id
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
    workload = await request.app[WORKLOADS].get(required(params, "workload_id"), _owner(request[CLAIMS]))
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
