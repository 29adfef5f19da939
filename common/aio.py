"""Running the event loop, and stopping asyncio tasks that wait on nng."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

try:
    import uvloop
except ImportError:  # not built for this platform: the standard loop does the same, slower
    uvloop = None

T = TypeVar("T")

logger = logging.getLogger(__name__)


async def stop_tasks(tasks: Iterable[asyncio.Task], timeout: float = 2.0) -> None:
    """Cancel ``tasks`` and wait for them, at most ``timeout`` seconds.

    Close the nng sockets they wait on *first*: a pending ``arecv`` that is cancelled just as
    a message arrives can miss its wake-up and never finish (seen with pynng 0.9), while a
    closed socket fails every pending operation at once.
    """
    tasks = [t for t in tasks if not t.done()]
    for t in tasks:
        t.cancel()
    if not tasks:
        return
    _, stuck = await asyncio.wait(tasks, timeout=timeout)
    for t in stuck:
        logger.warning("task %s did not stop within %.1fs; abandoning it", t.get_name(), timeout)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop where it is installed: a server's or worker's per-message
    overhead is mostly the loop's own (callbacks from nng's threads, socket readiness)."""
    factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
