"""Stopping a job's work: the worker sets an event for the thread that filters a job; the work
checks it between steps, frames and a kernel's bands (and a plugin's long loop may too)."""

from __future__ import annotations

import threading


class Stopped(Exception):
    """The job this work is for was cancelled (or timed out): raised at a :func:`checkpoint`."""


_work = threading.local()


def checkpoint() -> None:
    """Raise :class:`Stopped` if the job running in this thread was cancelled. The worker
    calls it between steps, frames and a kernel's tiles; a plugin's long loop may call it too."""
    stop = getattr(_work, "stop", None)
    if stop is not None and stop.is_set():
        raise Stopped("the job was cancelled")


def set_stop(stop: threading.Event | None) -> None:
    """The event that stops the work of the current thread (None: nothing stops it)."""
    _work.stop = stop
