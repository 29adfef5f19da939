"""What a push records with its workload, and how an interrupted push is told from a finished one.

The server counts a workload ``completed`` once every image it has is filtered: it cannot know
that a push stopped half-way. So ``dpip push`` and ``dpip video push``/``run`` record, when they
create the workload, how many images they are going to send (``meta.expected_images``); a
workload with fewer images than that is *partial*, whatever its status says.
"""

from __future__ import annotations

import time

#: The key in a workload's ``meta`` (the dashboard may read it too).
EXPECTED = "expected_images"

#: Seconds without a new upload after which a partial workload is taken as abandoned
#: (``--stall-timeout``): a push still running adds an image far more often than that.
STALL_TIMEOUT = 30.0


def meta(count: int | None, extra: dict | None = None) -> dict:
    """The workload ``meta`` for a push of ``count`` images (unknown: nothing recorded)."""
    recorded = dict(extra or {})
    if count:
        recorded[EXPECTED] = count
    return recorded


def expected(w: dict) -> int | None:
    """The images the workload's push announced, or None (pushed some other way)."""
    recorded = w.get("meta")
    value = recorded.get(EXPECTED) if isinstance(recorded, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def missing(w: dict) -> int:
    """How many of the announced images the server does not have."""
    want = expected(w)
    return max(0, want - int(w.get("images") or 0)) if want else 0


def status(w: dict) -> str:
    """The status to show: ``partial`` for a workload short of images with nothing left to do
    (all it has are done, or it has none)."""
    if missing(w) and (w["status"] == "completed" or not w.get("images")):
        return "partial"
    return w["status"]


def uploaded(w: dict) -> str:
    """The image count to show: ``30 of 137`` while some are missing."""
    images = w.get("images")
    if images is None:
        return "-"
    return f"{images} of {expected(w)}" if missing(w) else str(images)


def partial_error(w: dict, idle: float) -> str:
    """Why a watched workload stops short, in a sentence that says how to finish it."""
    return (f"workload {w['workload_id']} is partial: {w.get('images', 0)} of {expected(w)} images uploaded,"
            f" and no new one in {idle:.0f} s (an interrupted push?): finish it with the same push command"
            f" and --workload {w['workload_id']}")


class Stall:
    """Notices when a partial workload stops receiving images: ``done(w)`` is True once the
    workload is finished, or partial with no new image for ``timeout`` seconds."""

    def __init__(self, timeout: float = STALL_TIMEOUT) -> None:
        self.timeout = timeout
        self._images: int | None = None
        self._since = time.monotonic()

    def idle(self) -> float:
        return time.monotonic() - self._since

    def done(self, w: dict) -> bool:
        images = int(w.get("images") or 0)
        if images != self._images:
            self._images, self._since = images, time.monotonic()
        if not missing(w):
            return w["status"] == "completed"
        # short of images: over once the uploads have stopped and nothing else is left to do
        return self.idle() >= self.timeout and (w["status"] == "completed" or images == 0)
