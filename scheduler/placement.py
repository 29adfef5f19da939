"""Placement: a pure function of (job, worker snapshots) -> the worker to run it, or None.

No sockets, no clocks: it can be tested with plain data and swapped for another policy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerView:
    """What placement needs to know of a worker at one instant."""

    name: str
    tags: frozenset[str]
    cpu_percent: float
    memory_percent: float
    gpu_count: int
    gpu_utilization: float
    in_flight: int  # jobs the scheduler has on it now (its own count, fresher than telemetry)
    capacity: int
    ready: bool = True  # alive, welcomed and not draining
    probation: bool = False  # another worker just beat it to a job it held: others first
    filters: frozenset[str] | None = None  # the filters it runs (None: any)
    gpu_filters: frozenset[str] = frozenset()  # those it runs on its GPU
    ahead: int = 0  # jobs it may hold beyond capacity, waiting there for a slot (its prefetch)


@dataclass(frozen=True)
class JobView:
    tags: frozenset[str] = frozenset()
    avoid: frozenset[str] = frozenset()  # workers that already failed this job
    wants_gpu: bool = False
    needs: frozenset[str] = frozenset()  # the filters of its pipeline


def eligible(job: JobView, w: WorkerView, ahead: bool = False) -> bool:
    """A worker may take a job if it is ready, has a free slot (``ahead``: or room for a job
    to wait there for one), every tag the job needs and every filter of its pipeline."""
    room = w.capacity + (w.ahead if ahead else 0)
    return w.ready and w.in_flight < room and job.tags <= w.tags and runs(job, w)


def runs(job: JobView, w: WorkerView) -> bool:
    return w.filters is None or job.needs <= w.filters


def score(job: JobView, w: WorkerView) -> float:
    """Higher is better: free slots weigh most, then idle CPU, free memory, and a free GPU."""
    free_slots = 1.0 - w.in_flight / w.capacity
    s = 0.5 * free_slots + 0.3 * (1.0 - w.cpu_percent / 100.0) + 0.2 * (1.0 - w.memory_percent / 100.0)
    if w.gpu_count > 0:
        gpu_work = job.wants_gpu or bool(job.needs & w.gpu_filters)  # a step it runs on its GPU
        s += (0.3 if gpu_work else 0.05) * (1.0 - w.gpu_utilization / 100.0)
    if w.probation:
        s -= 5.0  # a slow worker (a hedge beat it lately) gets work only when others are full
    if w.name in job.avoid:
        s -= 10.0  # only if nobody else can take it
    return s


def why_not(job: JobView, workers: Iterable[WorkerView]) -> str:
    """Why ``place`` found nobody, in words a user can act on."""
    ready = [w for w in workers if w.ready]
    if not ready:
        return "waiting for a live worker"
    tagged = [w for w in ready if job.tags <= w.tags]
    if not tagged:
        return f"waiting for a live worker with tags {','.join(sorted(job.tags))}"
    able = [w for w in tagged if runs(job, w)]
    if not able:
        missing = sorted(n for n in job.needs if not any(w.filters is None or n in w.filters for w in tagged))
        what = (f"filter{'s' if len(missing) > 1 else ''} {', '.join(missing)}" if missing
                else f"all of {', '.join(sorted(job.needs))} (no one worker runs them all)")
        return f"waiting for a live worker that runs {what}" + (
            f" (with tags {','.join(sorted(job.tags))})" if job.tags else "")
    tagged = able
    return f"waiting for a free slot: {len(tagged)} eligible worker(s) are full"


def place(job: JobView, workers: Iterable[WorkerView], ahead: bool = False) -> str | None:
    """The best eligible worker's name, ties going to the first listed; None if nobody fits
    (``ahead``: counting the room for jobs sent ahead, to wait on the worker for a slot).

    The caller rotates the list between calls, so equal workers share the work instead of
    the same one winning every tie (on one machine all workers report the same CPU).
    """
    best: tuple[float, str] | None = None
    for w in workers:
        if not eligible(job, w, ahead):
            continue
        s = score(job, w)
        if best is None or s > best[0]:
            best = (s, w.name)
    return best[1] if best else None
