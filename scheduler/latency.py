"""Recent job latencies by image size, for choosing when to hedge. Pure: no clocks, no I/O."""

from __future__ import annotations

import bisect
import math
from collections import deque


def size_class(size: int) -> int:
    """Images within a factor of 4 in bytes share a class (64 KiB, 256 KiB, 1 MiB, ...)."""
    return max(0, math.ceil(math.log(max(size, 1) / 65536, 4)))


class LatencyTracker:
    """The last ``window`` latencies (seconds) of each size class, kept in arrival order and
    sorted (a quantile is asked for two or three times per job, a latency recorded once)."""

    def __init__(self, window: int = 300, min_samples: int = 20) -> None:
        self.window = window
        self.min_samples = min_samples
        self._samples: dict[int, tuple[deque[float], list[float]]] = {}

    def record(self, size: int, seconds: float) -> None:
        arrived, ordered = self._samples.setdefault(size_class(size), (deque(), []))
        if len(arrived) == self.window:
            del ordered[bisect.bisect_left(ordered, arrived.popleft())]
        arrived.append(seconds)
        bisect.insort(ordered, seconds)

    def percentile(self, size: int, q: float) -> float | None:
        """The ``q`` quantile of this size's recent latencies; None until there are enough."""
        samples = self._samples.get(size_class(size))
        if samples is None or len(samples[1]) < self.min_samples:
            return None
        ordered = samples[1]
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
