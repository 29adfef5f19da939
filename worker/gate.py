"""A worker's slots: jobs it was sent beyond its capacity (the prefetch) wait here for one.

The server may send a worker a few jobs more than it runs at once (``--prefetch``), so that a
job ending starts the next at once instead of waiting for the server to hear of the end and send
another (a round trip per job: 5-20 ms on a busy machine, 5-20% of a 100 ms job). Those wait in
line here, in the order they came; a slot freed goes to the oldest. A waiting job that is
cancelled leaves the line; one cancelled just as it was given a slot passes the slot on. When
the worker drains, everyone waiting is told no (the server sends their jobs elsewhere).
"""

from __future__ import annotations

import asyncio
from collections import deque


class SlotGate:
    def __init__(self, slots: int) -> None:
        self.free = slots
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._closed = False

    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def enter(self) -> bool:
        """Take a slot (waiting in line for one): True, or False once the gate is closed."""
        if self._closed:
            return False
        if self.free > 0 and not self.waiting():
            self.free -= 1
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.leave()  # given a slot as we were cancelled: the next in line has it
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def leave(self) -> None:
        """A slot taken by :meth:`enter` is free: to the oldest waiting, else kept."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self.free += 1

    def close(self) -> None:
        """No slot for anyone waiting now or later (the worker drains)."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(False)
