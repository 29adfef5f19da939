"""Login throttling: too many failed logins for a user from an address, or from an address at
all, within a window, and further attempts get 429 with Retry-After until it has passed."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


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

    def failed(self, key: object) -> None:
        q = self._prune(key)
        if q is None:
            if len(self._failures) > 100_000:  # bound memory under a spray of keys
                self._failures.clear()
            q = self._failures[key] = deque()
        q.append(self.clock())

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
