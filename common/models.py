"""Domain types shared by the datastore, the API and the scheduler."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

#: The two filters of the course; a bodiless POST /workloads means the first.
COURSE = ("grayscale", "blur")

#: Largest image accepted or decoded, width x height (the server's --max-pixels default, the
#: worker's own limit; :mod:`imaging.formats` says it too): a header is read before any pixel,
#: so a small file that claims a huge image costs nothing.
MAX_PIXELS = 50_000_000

#: A job's budget by default, in pixel-steps (each step's pixels, summed over steps and frames):
#: a 50-megapixel photo through 4 steps, a 12-megapixel one through all 10. Bounds the CPU a job
#: costs (tens of ns a pixel-step) whatever a small upload asks for.
PIXEL_STEPS_PER_PIXEL = 4


@dataclass(frozen=True)
class Limits:
    """What one job may make and spend: the largest image (any step's, on any frame) and its
    budget of pixel-steps."""

    max_pixels: int = MAX_PIXELS
    max_pixel_steps: int = PIXEL_STEPS_PER_PIXEL * MAX_PIXELS

    @classmethod
    def of(cls, max_pixels: int, max_pixel_steps: int = 0) -> "Limits":
        """The limits for ``max_pixels``, the budget its default multiple unless given."""
        return cls(max_pixels, max_pixel_steps or PIXEL_STEPS_PER_PIXEL * max_pixels)


#: Error messages quote at most this many characters of what the client sent.
QUOTE_LIMIT = 80


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of the client's input for an error message, cut to ``limit`` characters: an
    error body must not echo a megabyte back."""
    text = value if isinstance(value, str) else str(value)
    return f"{text[:limit]!r}…" if len(text) > limit else repr(text)


def clipped(text: str, limit: int = QUOTE_LIMIT) -> str:
    """The client's input as it is (no quotes), cut to ``limit`` characters."""
    return f"{text[:limit]}…" if len(text) > limit else text


def json_loads(text: str) -> object:
    """JSON as a client may send it: an object naming a key twice is refused (ValueError), as
    are NaN and Infinity (no JSON, and browsers cannot read them back)."""
    return json.loads(text, object_pairs_hook=_once, parse_constant=_not_json)


def _once(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {quoted(key, 40)} is given twice")
        out[key] = value
    return out


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class DpipError(Exception):
    """Base of every domain error. Each class carries the HTTP status (and headers) the API
    answers it with; one that says nothing more is a server-side failure (500)."""

    status = 500

    def headers(self) -> dict[str, str]:
        return {}


class NotFound(DpipError):
    """The thing asked for does not exist (or is not the caller's)."""

    status = 404


class Unauthorized(DpipError):
    """No credentials, or credentials that are wrong, expired or revoked."""

    status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="dpip"'}


class LoginFailed(Unauthorized):
    """Wrong or missing user name and password at ``/login`` (which takes HTTP Basic)."""

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Basic realm="dpip", charset="UTF-8"'}


class Forbidden(DpipError):
    """Valid credentials that do not allow this action."""

    status = 403


class TooManyRequests(DpipError):
    """Slow down: try again after ``retry_after`` seconds."""

    status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class Conflict(DpipError):
    """The request clashes with existing state, e.g. a workload name in use."""

    status = 409


class BadInput(DpipError):
    """The request is malformed or the data is not acceptable."""

    status = 400


class TooLarge(BadInput):
    """The upload exceeds the size limit."""

    status = 413


class QuotaExceeded(TooLarge):
    """The upload would take its owner past their quota of stored bytes."""


class UnsupportedMedia(BadInput):
    """The request body is not of a media type the endpoint takes."""

    status = 415


class Unavailable(DpipError):
    """A service the request needs (the database, the object store) cannot be reached right
    now; the same request may succeed shortly."""

    status = 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "2"}


class InsufficientStorage(DpipError):
    """No space left where images or records are kept."""

    status = 507


class Filter(str):
    """A workload's filter as it is stored: one filter's name (its parameters beside it), or a
    pipeline's canonical text (:mod:`filtering.pipeline`). ``value`` is the text, as an enum's was."""

    GRAYSCALE: "Filter"
    BLUR: "Filter"

    @property
    def value(self) -> str:
        return str(self)


Filter.GRAYSCALE, Filter.BLUR = Filter(COURSE[0]), Filter(COURSE[1])


class ImageType(str, Enum):
    ORIGINAL = "original"
    FILTERED = "filtered"


class JobState(str, Enum):
    """``queued -> dispatched -> done | failed``; a dispatched job may go back to queued."""

    QUEUED = "queued"
    DISPATCHED = "dispatched"
    DONE = "done"
    FAILED = "failed"


class WorkloadStatus(str, Enum):
    SCHEDULING = "scheduling"
    RUNNING = "running"
    COMPLETED = "completed"


@dataclass(frozen=True)
class Workload:
    id: str
    name: str
    owner: str
    filter: Filter
    tags: tuple[str, ...]
    created_at: float
    meta: dict = field(default_factory=dict, compare=False)  # the client's, e.g. a video's rate
    dir: str = ""  # its directory under images/: unique, unlike names (each owner has his own)
    params: dict = field(default_factory=dict, compare=False)  # the filter's, validated (radius)

    def __post_init__(self) -> None:
        if not self.dir:
            object.__setattr__(self, "dir", self.name)


@dataclass(frozen=True)
class WorkloadView:
    """What ``GET /workloads/{id}`` shows: the row plus counts derived from images and jobs."""

    workload: Workload
    image_count: int
    filtered_images: list[int]
    failed_images: list[dict]
    running_jobs: int
    started: bool

    @property
    def status(self) -> WorkloadStatus:
        """Completed once it has images and each is filtered or failed for good (the rule
        ``storage.schema.COMPLETED`` says in SQL over the counters)."""
        finished = len(self.filtered_images) + len(self.failed_images)
        if self.image_count > 0 and finished >= self.image_count:
            return WorkloadStatus.COMPLETED
        if self.running_jobs > 0 or self.started:
            return WorkloadStatus.RUNNING
        return WorkloadStatus.SCHEDULING

    def to_json(self, waiting_reason: str | None = None) -> dict:
        """The API's representation (but its ``steps``: :func:`filtering.pipeline.steps_json`);
        ``waiting_reason`` says why queued jobs are not running."""
        w = self.workload
        return {
            "workload_id": w.id,
            "filter": w.filter.value,
            "params": w.params,
            "workload_name": w.name,
            "status": self.status.value,
            "running_jobs": self.running_jobs,
            "filtered_images": self.filtered_images,
            "images": self.image_count,
            "failed_images": self.failed_images,
            "tags": list(w.tags),
            "meta": w.meta,
            "waiting_reason": waiting_reason if self.status != WorkloadStatus.COMPLETED else None,
            "partial": self.partial,
        }

    @property
    def partial(self) -> bool:
        """Fewer images than its client said it would send (``meta.expected_images``): a push
        that stopped half-way, whatever the status says of the images it has."""
        expected = self.workload.meta.get("expected_images")
        return isinstance(expected, int) and not isinstance(expected, bool) and expected > self.image_count


@dataclass(frozen=True)
class Job:
    """A snapshot of a persisted unit of work: filter image ``image_id`` of ``workload_id``.
    Only :mod:`controller.jobs` makes new ones, as it changes the row."""

    id: int
    workload_id: str
    image_id: int
    filter: Filter
    tags: tuple[str, ...] = ()
    attempts: int = 0
    size: int = 0  # bytes of the original: latencies are compared between similar sizes
    state: JobState = JobState.QUEUED
    params: dict = field(default_factory=dict, compare=False)  # its workload's filter parameters
    workload_dir: str = field(default="", compare=False)  # where its images live (Workload.dir)
    #: the original's (format, width, height, mode), to judge a result by; None if unknown
    original: tuple[str, int, int, str] | None = field(default=None, compare=False)
    #: a job sent while its upload's row is being committed (JobLifecycle.accept_original):
    #: whether that row was committed, once known. None: the row was there before the job left.
    committed: Any = field(default=None, compare=False, repr=False)  # asyncio.Future[bool] | None


#: What a workload's name (its directory) may be, like a worker's and a tag: always fullmatch
#: ("$" would pass a trailing newline).
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")



def check_workload_name(name: str) -> str:
    """A workload name becomes a directory: only ``[A-Za-z0-9._-]``, 1..64 chars, not dots."""
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise BadInput(
            "workload_name must be 1-64 characters of letters, digits, '.', '_' or '-'"
            f" (got {quoted(name)})"
        )
    return name
