"""What the controller knows of one worker (:class:`WorkerInfo`) and its liveness states: the
record :mod:`controller.membership` keeps per name, the scheduler reads, ``/status`` shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from filtering import registry
from filtering.model import FilterSpec
from plane import wire
from plane.seal import Channel

#: What a worker that declares no filters runs: the built-ins of this server.
BUILTINS = tuple(n for n, s in registry.REGISTRY.items() if s.builtin)

#: Slots a newcomer is trusted with before it has proven more (slow start: twice as many each
#: time half of them came back with stored results). Eight, as TCP's initial window is ten
#: segments (RFC 6928): a worker of up to 8 slots uses them all from its first jobs (with 4, a
#: fleet of 8-slot workers from a cold start ran its first round at half its slots), while a
#: worker that takes jobs and never answers holds at most 8 until their timeout.
TRUSTED_AT_FIRST = 8


class WorkerState(str, Enum):
    """Where a worker is in its life, as membership sees it.

    ``gone`` (not a member: never welcomed this run, lost, or left) -> welcome -> ``welcomed``
    -> first sealed heartbeat -> ``alive`` <-> ``draining`` (as its heartbeats say) -> silent for
    the TTL, a goodbye, or a restart under the same name -> ``gone``."""

    GONE = "gone"
    WELCOMED = "welcomed"
    ALIVE = "alive"
    DRAINING = "draining"


@dataclass
class WorkerInfo:
    """What the controller knows of one worker: its last heartbeat and its liveness."""

    name: str
    tags: list[str] = field(default_factory=list)
    session: str = ""
    rpc_address: str = ""
    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    gpu: wire.Gpu = field(default_factory=wire.Gpu)
    running_jobs: int = 0
    waiting_jobs: int = 0  # sent ahead, waiting there for a slot
    capacity: int = 0
    prefetch: int = 0  # jobs it takes beyond its capacity, waiting there for a slot
    jobs_done: int = 0
    last_seen: float = 0.0  # wall clock, for people
    last_seen_mono: float = 0.0  # monotonic, for the TTL and forgetting
    state: WorkerState = WorkerState.GONE
    welcomed_at: float = 0.0  # monotonic
    running_job_ids: list[int] = field(default_factory=list)
    channel: Channel | None = field(default=None, repr=False)  # the session key; None when dead
    trust: int = TRUSTED_AT_FIRST  # the slots its claimed capacity is trusted to, this session
    proven: int = 0  # its results stored since its trust last doubled
    #: the filters it runs, as it declared them when it joined; None: it declared none (an
    #: older worker): the server's built-ins
    filters: dict[str, FilterSpec] | None = field(default=None, repr=False)
    filter_names: frozenset[str] = field(default_factory=lambda: frozenset(BUILTINS), repr=False)
    gpu_filters: frozenset[str] = field(default_factory=frozenset, repr=False)  # run on its GPU

    def declare(self, declared: dict[str, tuple[FilterSpec, bool]] | None) -> None:
        """Take what it declared when it joined: each filter, and whether it runs on its GPU."""
        self.filters = {n: spec for n, (spec, _) in declared.items()} if declared is not None else None
        self.filter_names = frozenset(declared) if declared is not None else frozenset(BUILTINS)
        self.gpu_filters = frozenset(n for n, (_, gpu) in (declared or {}).items() if gpu)

    @property
    def alive(self) -> bool:
        """Heartbeating (draining or not)."""
        return self.state in (WorkerState.ALIVE, WorkerState.DRAINING)

    @property
    def welcomed(self) -> bool:
        """A member: welcomed on its current session, whether it has heartbeated yet or not."""
        return self.state != WorkerState.GONE

    @property
    def draining(self) -> bool:
        return self.state == WorkerState.DRAINING

    @property
    def ready(self) -> bool:
        """It may be given jobs: alive, not draining, with room for some."""
        return self.state == WorkerState.ALIVE and self.capacity > 0

    def slots(self) -> int:
        """The jobs it may hold at once: what it claims, but no more than it has proven it can
        (8 at first, twice as many each time half of them came back with stored results, as
        TCP's slow start: a claim of 4096 wins nothing at once, an honest 8 slots are in use
        after one round of jobs)."""
        return min(self.capacity, self.trust)

    def ahead(self) -> int:
        """The jobs it may be sent beyond its slots, to wait there for one (its prefetch, no more
        than its trusted slots)."""
        return min(self.prefetch, self.slots())

    def credit(self) -> None:
        """One of its results was stored."""
        if self.trust >= self.capacity:
            return
        self.proven += 1
        if 2 * self.proven >= self.trust:
            self.trust, self.proven = min(self.capacity, 2 * self.trust), 0

    def distrust(self) -> None:
        """A new process under this name: it proves itself again."""
        self.trust, self.proven = TRUSTED_AT_FIRST, 0

    def to_json(self, admin: bool = False) -> dict:
        """The API's view; the RPC address (where to send jobs) is for admins only."""
        out = {
            "name": self.name,
            "tags": self.tags,
            "alive": self.alive,
            "cpu_percent": self.cpu_percent,
            "memory_percent": self.memory_percent,
            "gpu": {
                "count": self.gpu.count,
                "utilization_percent": self.gpu.utilization_percent,
                "memory_percent": self.gpu.memory_percent,
            },
            "running_jobs": self.running_jobs,
            "waiting_jobs": self.waiting_jobs,
            "capacity": self.capacity,
            "prefetch": self.prefetch,
            "jobs_done": self.jobs_done,
            "last_seen": self.last_seen,
            # compact (a worker's entry is sent again on the event stream whenever its load moves):
            # the names, the versions of those that have one (plugins), those run on its GPU
            "filters": list(self.filters) if self.filters is not None else list(BUILTINS),
            "filter_versions": {n: s.version for n, s in (self.filters or {}).items() if s.version},
            "gpu_filters": sorted(self.gpu_filters),
        }
        if admin:
            out["rpc_address"] = self.rpc_address
        return out
