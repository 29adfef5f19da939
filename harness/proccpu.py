"""CPU time of processes and of their threads, from /proc: what a benchmark charges to the
server per image. CPU seconds move far less with a shared machine's noise than wall time does.

Threads are told apart by what they are: the event loop (the main thread), nng's own threads
(named ``nng:...``), and the others (executor threads: file writes and fsyncs, SQLite)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Cpu:
    """CPU seconds in user space and in the kernel."""

    user: float = 0.0
    kernel: float = 0.0

    @property
    def total(self) -> float:
        return self.user + self.kernel

    def __add__(self, other: Cpu) -> Cpu:
        return Cpu(self.user + other.user, self.kernel + other.kernel)

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user - other.user, self.kernel - other.kernel)


def _stat(path: Path) -> Cpu:
    fields = path.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return Cpu(int(fields[11]) / _TICK, int(fields[12]) / _TICK)


def process_cpu(pid: int) -> Cpu:
    """Every thread of ``pid`` so far (threads that ended included)."""
    return _stat(Path(f"/proc/{pid}/stat"))


def _kind(pid: int, tid: str) -> str:
    if tid == str(pid):
        return "event loop"
    try:
        comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "other threads"
    return "nng" if comm.startswith("nng:") else "other threads"


def threads_cpu(pid: int) -> dict[str, Cpu]:
    """CPU of ``pid``'s live threads, summed by kind (see the module's text)."""
    out: dict[str, Cpu] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpu = _stat(task / "stat")
        except OSError:
            continue  # the thread ended meanwhile
        kind = _kind(pid, task.name)
        out[kind] = out.get(kind, Cpu()) + cpu
    return out


class CpuMeter:
    """CPU spent by a server and by its workers between :meth:`start` and :meth:`stop`."""

    def __init__(self, server: int, workers: Iterable[int] = ()) -> None:
        self.server = server
        self.workers = list(workers)

    def start(self) -> CpuMeter:
        self._server0 = process_cpu(self.server)
        self._threads0 = threads_cpu(self.server)
        self._workers0 = sum((process_cpu(p) for p in self.workers), Cpu())
        return self

    def stop(self) -> Spent:
        threads1 = threads_cpu(self.server)
        kinds = {k: c - self._threads0.get(k, Cpu()) for k, c in threads1.items()}
        return Spent(process_cpu(self.server) - self._server0,
                     sum((process_cpu(p) for p in self.workers), Cpu()) - self._workers0, kinds)


@dataclass(frozen=True)
class Spent:
    server: Cpu
    workers: Cpu
    by_kind: dict[str, Cpu]  # the server's, by kind of thread (threads alive at the end)

    def per_image_ms(self, images: int) -> float:
        return 1000 * self.server.total / images

    def breakdown(self, images: int) -> str:
        """E.g. ``event loop 2.1 (kernel 0.4), other threads 3.5 (kernel 3.1)`` in ms per image."""
        parts = []
        for kind in ("event loop", "other threads", "nng"):
            cpu = self.by_kind.get(kind)
            if cpu is not None:
                parts.append(f"{kind} {1000 * cpu.total / images:.2f} (kernel {1000 * cpu.kernel / images:.2f})")
        return ", ".join(parts) + " ms per image"
