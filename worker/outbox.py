"""A worker's job ends waiting to be sent to its server (one outbox per session).

Jobs end in any order; their results (and the jobs whose cancel is complete) pile up here until
the session's sender takes them all, in one numbered
:class:`~plane.wire.Results` batch (up to :data:`~plane.wire.BATCH_BYTES` of images, at least
one result). A batch is kept until a later Exchange acknowledges it; those not acknowledged
when the session's connection is made again go again, first.
"""

from __future__ import annotations

import asyncio
from collections import deque

from plane import wire


class Outbox:
    def __init__(self) -> None:
        self._results: list[wire.JobResult] = []
        self._stopped: list[int] = []
        self._sent: dict[int, tuple[list[wire.JobResult], list[int]]] = {}  # batch -> what, until acked
        self._batch = 0
        self._waiters: deque[asyncio.Future[None]] = deque()  # takers waiting (a session's sender; a new connection's may overlap the old one's), oldest first
        self._woken = False  # one of them was woken and has not taken yet (wake no other)

    def put(self, result: wire.JobResult) -> None:
        self._results.append(result)
        self._wake()

    def stopped(self, job_id: int) -> None:
        self._stopped.append(job_id)
        self._wake()

    def _wake(self) -> None:
        if self._woken:
            return  # the one woken takes everything there is when it runs
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._woken = True
                return

    def waiting(self) -> int:
        """Job ends not yet taken, or taken but not acknowledged."""
        return len(self._results) + len(self._stopped) + sum(len(r) + len(s) for r, s in self._sent.values())

    def ack(self, batches: list[int]) -> None:
        """The server received these batches: forget them."""
        for n in batches:
            self._sent.pop(n, None)

    async def take(self, hold: float) -> wire.Results:
        """The next batch: every end there is, as soon as there is one (the oldest caller
        first), or an empty batch after ``hold`` seconds."""
        if not self._results and not self._stopped or self._waiters:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, hold)
            except TimeoutError:
                return wire.Results(batch=0)
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # woken, but gone: another takes
                    self._woken = False
                    if self._results or self._stopped:
                        self._wake()
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            self._woken = False
        taken, self._results = wire.first_batch(self._results)
        stopped, self._stopped = self._stopped[:wire.MAX_BATCH], self._stopped[wire.MAX_BATCH:]
        if self._results or self._stopped:
            self._wake()  # the next taker takes the rest
        if not taken and not stopped:
            return wire.Results(batch=0)
        self._batch += 1
        self._sent[self._batch] = (taken, stopped)
        return wire.Results(batch=self._batch, results=taken, stopped=stopped)

    def resend_unacked(self) -> None:
        """Every batch taken but not acknowledged goes again, first (a new connection: the old
        one may have lost them)."""
        for results, stopped in reversed(list(self._sent.values())):
            self._results[:0] = results
            self._stopped[:0] = stopped
        self._sent.clear()
        if self._results or self._stopped:
            self._wake()
