"""Login throttling: too many failed logins for a user from an address, or from an address at
all, within a window, and further attempts get 429 with Retry-After until it has passed.

An attempt counts as a failure from the moment it starts (its password hash takes a while, and
attempts sent at once would otherwise all pass the check before any had failed); a success takes
it back. Few attempts per user and address may be under way at once; others wait their turn.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from controller.models import TooManyRequests


class FailureLimiter:
    """At most ``limit`` failures per key within ``window`` seconds. Pure apart from the clock."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._failures: dict[object, deque[float]] = {}

    def retry_after(self, key: object) -> float:
        """Seconds until ``key`` may try again; 0 if it may now."""
        q = self._prune(key)
        if q is None or len(q) < self.limit:
            return 0.0
        return max(0.0, q[0] + self.window - self.clock())

    def failed(self, key: object) -> float:
        """Count a failure (or an attempt not yet known to succeed); returns its time stamp."""
        q = self._prune(key)
        if q is None:
            if len(self._failures) > 100_000:  # bound memory under a spray of keys
                self._failures.clear()
            q = self._failures[key] = deque()
        stamp = self.clock()
        q.append(stamp)
        return stamp

    def forget(self, key: object, stamp: float) -> None:
        """Take back one failure counted by :meth:`failed` (the attempt succeeded after all)."""
        q = self._failures.get(key)
        if q is not None and stamp in q:
            q.remove(stamp)
            if not q:
                del self._failures[key]

    def succeeded(self, key: object) -> None:
        self._failures.pop(key, None)

    def _prune(self, key: object) -> deque[float] | None:
        q = self._failures.get(key)
        if q is None:
            return None
        cutoff = self.clock() - self.window
        while q and q[0] <= cutoff:
            q.popleft()
        if not q:
            del self._failures[key]
            return None
        return q


@dataclass(frozen=True)
class LoginAttempt:
    """A login under way: what :meth:`LoginThrottle.begin` counted, for :meth:`LoginThrottle.end`."""

    user: str
    address: str
    address_stamp: float  # its failure in the per-address count, taken back on success


class LoginThrottle:
    """Failed logins per (user, address) and per address; logins under way per (user, address).

    An attempt that would pass the limits only if those under way succeed waits for them (a
    few hundred ms: many clients behind one address may log in at once); one that the failures
    already block, or that would wait too long or among too many, gets 429 at once.
    """

    def __init__(self, failures: int, window: float = 60.0, max_in_flight: int = 2,
                 max_waiting: int = 32, max_wait: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_user = FailureLimiter(failures, window, clock)
        self.per_address = FailureLimiter(4 * failures, window, clock)
        self.max_in_flight = max_in_flight
        self.max_waiting = max_waiting  # per address
        self.max_wait = max_wait
        self._in_flight: dict[object, int] = {}  # by (user, address) and by address
        self._waiting: dict[str, int] = {}
        self._ended = asyncio.Event()  # replaced by a fresh one each time an attempt ends

    async def begin(self, user: str, address: str) -> LoginAttempt:
        """Admit an attempt, counted as failed until :meth:`end` says otherwise, or raise
        :class:`TooManyRequests`. Check and count happen with no await between them, so
        concurrent attempts cannot all pass the check before any has failed."""
        key = (user, address)
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while True:
            user_wait = self.per_user.retry_after(key)
            address_wait = self.per_address.retry_after(address)
            if not user_wait and not address_wait and self._in_flight.get(key, 0) < self.max_in_flight:
                return self._admit(user, address)
            if (user_wait and not self._in_flight.get(key)) or (address_wait and not self._in_flight.get(address)):
                wait = max(user_wait, address_wait)  # real failures, not attempts under way
                raise TooManyRequests(f"too many failed logins: try again in {wait:.0f} s", wait)
            await self._wait_for_an_end(address, deadline)

    async def _wait_for_an_end(self, address: str, deadline: float) -> None:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0 or self._waiting.get(address, 0) >= self.max_waiting:
            raise TooManyRequests("too many logins at once: try again in 1 s", 1.0)
        self._waiting[address] = self._waiting.get(address, 0) + 1
        try:
            await asyncio.wait_for(self._ended.wait(), left)
        except TimeoutError as e:
            raise TooManyRequests("too many logins at once: try again in 1 s", 1.0) from e
        finally:
            _decrement(self._waiting, address)

    def _admit(self, user: str, address: str) -> LoginAttempt:
        for k in ((user, address), address):
            self._in_flight[k] = self._in_flight.get(k, 0) + 1
        self.per_user.failed((user, address))
        return LoginAttempt(user, address, self.per_address.failed(address))

    def end(self, attempt: LoginAttempt, ok: bool) -> None:
        """The attempt is over: a success clears the user's failures and takes back its own."""
        key = (attempt.user, attempt.address)
        _decrement(self._in_flight, key)
        _decrement(self._in_flight, attempt.address)
        if ok:
            self.per_user.succeeded(key)
            self.per_address.forget(attempt.address, attempt.address_stamp)
        self._ended.set()  # the waiters look again
        self._ended = asyncio.Event()


def _decrement(counts: dict, key: object) -> None:
    left = counts.pop(key, 1) - 1
    if left > 0:
        counts[key] = left
