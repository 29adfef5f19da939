"""Prometheus metrics (prometheus-client), one registry per app so tests can run several.

Counters and the histogram are updated as things happen (HTTP middleware, the scheduler's
job-done hook); gauges (jobs by state, queue depth, workers) are read fresh at each scrape.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from api.ports import SchedulerPort
from common.models import Job, JobState
from controller.jobs import JobTraffic
from controller.membership import Membership
from filtering.pipeline import label_of
from storage.datastore import Datastore

#: Seconds from dispatch to the result stored: a small image takes ~30 ms, a 720p frame ~150 ms.
DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("dpip_http_requests", "HTTP requests by route, method and status",
                                     ["route", "method", "status"], registry=r)
        self.job_duration = Histogram("dpip_job_duration_seconds", "Dispatch to result stored, per finished job",
                                      ["filter"], buckets=DURATION_BUCKETS, registry=r)
        self.jobs = Gauge("dpip_jobs", "Jobs by state", ["state"], registry=r)
        self.queue_depth = Gauge("dpip_queue_depth", "Jobs queued in the scheduler, waiting for a slot", registry=r)
        self.workers_alive = Gauge("dpip_workers_alive", "Workers alive now", registry=r)
        self.job_bytes = Gauge("dpip_job_image_bytes", "Image bytes this server relayed for jobs since it"
                               " started (to workers: originals; from workers: results)", ["direction"],
                               registry=r)
        self.results_discarded = Gauge("dpip_job_results_discarded", "Results of jobs that another copy's result"
                                       " beat (hedged or tied pairs that both finished), dropped since it started",
                                       registry=r)
        self.logins_slowed = Counter("dpip_logins_slowed", "Logins from a place new to their user made to wait"
                                     " while the account is past its budget of failed logins", registry=r)
        self.free_bytes = Gauge("dpip_free_bytes", "Free bytes on the disk where images or the datastore"
                                " are kept (files and SQLite only)", ["store"], registry=r)
        self.leader = Gauge("dpip_scheduling", "1 if this server schedules (leads), 0 if it is a standby",
                            registry=r)
        self.worker_alive = Gauge("dpip_worker_alive", "1 if the worker is alive", ["worker"], registry=r)
        self.worker_cpu = Gauge("dpip_worker_cpu_percent", "CPU use reported by the worker", ["worker"], registry=r)
        self.worker_memory = Gauge("dpip_worker_memory_percent", "Memory use reported by the worker",
                                   ["worker"], registry=r)
        self.worker_running = Gauge("dpip_worker_running_jobs", "Jobs running on the worker", ["worker"], registry=r)
        self.worker_capacity = Gauge("dpip_worker_capacity", "Jobs the worker runs at once", ["worker"], registry=r)
        self.plane_refused = Gauge("dpip_worker_plane_refused",
                                   "Worker-plane messages refused: wrong join token, bad seal, replay", registry=r)
        self.plane_vanished = Gauge("dpip_worker_plane_vanished",
                                    "Worker hellos read after their connection had closed (a worker restarting or"
                                    " stopping): dropped, not refused", registry=r)
        self.plane_bad = Gauge("dpip_worker_plane_bad_messages", "Worker-plane messages that did not decode",
                               registry=r)
        self.welcomes_failed = Gauge("dpip_worker_welcomes_failed",
                                     "Hellos whose worker could not be welcomed at its RPC address (gone, or"
                                     " with TLS: its certificate is not of the client CA or does not name it)",
                                     registry=r)
        self.worker_done = Gauge("dpip_worker_jobs_done", "Jobs the worker finished since it started",
                                 ["worker"], registry=r)

    def job_done(self, job: Job, seconds: float) -> None:
        self.job_duration.labels(label_of(job.filter.value)).observe(seconds)

    def request(self, route: str, method: str, status: int) -> None:
        self.http_requests.labels(route, method, str(status)).inc()

    async def render(self, store: Datastore, scheduler: SchedulerPort, membership: Membership,
                     traffic: JobTraffic | None = None, storage: dict | None = None) -> bytes:
        for name, space in (storage or {}).items():
            if space is not None:
                self.free_bytes.labels(name).set(space["free_bytes"])
        if traffic is not None:
            self.job_bytes.labels("to_workers").set(traffic.to_workers)
            self.job_bytes.labels("from_workers").set(traffic.from_workers)
            self.results_discarded.set(traffic.discarded)
        counts = await store.job_counts()
        for state in JobState:
            self.jobs.labels(state.value).set(counts.get(state.value, 0))
        self.queue_depth.set(scheduler.queued())
        self.leader.set(1 if scheduler.describe().get("leader") else 0)
        workers = membership.snapshot()
        self.workers_alive.set(sum(w.alive for w in workers))
        self.plane_refused.set(membership.refused)
        self.plane_bad.set(membership.bad_messages)
        self.plane_vanished.set(membership.vanished)
        self.welcomes_failed.set(membership.welcomes_failed)
        per_worker = (self.worker_alive, self.worker_cpu, self.worker_memory, self.worker_running,
                      self.worker_capacity, self.worker_done)
        for gauge in per_worker:
            gauge.clear()  # a worker that is gone leaves no stale series
        for w in workers:
            self.worker_alive.labels(w.name).set(int(w.alive))
            self.worker_cpu.labels(w.name).set(w.cpu_percent)
            self.worker_memory.labels(w.name).set(w.memory_percent)
            self.worker_running.labels(w.name).set(w.running_jobs)
            self.worker_capacity.labels(w.name).set(w.capacity)
            self.worker_done.labels(w.name).set(w.jobs_done)
        return generate_latest(self.registry)


def route_of(request: web.Request) -> str:
    """The route's pattern (``/images/{image_id}``), so that ids do not explode the label set."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def response(body: bytes) -> web.Response:
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
