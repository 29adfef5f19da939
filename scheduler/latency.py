"""Recent job latencies by image size, for choosing when to hedge. Pure: no clocks, no I/O."""

from __future__ import annotations

import math
from collections import deque


def size_class(size: int) -> int:
    """Images within a factor of 4 in bytes share a class (64 KiB, 256 KiB, 1 MiB, ...)."""
    return max(0, math.ceil(math.log(max(size, 1) / 65536, 4)))


class LatencyTracker:
    """The last ``window`` latencies (seconds) of each size class."""

    def __init__(self, window: int = 300, min_samples: int = 20) -> None:
        self.window = window
        self.min_samples = min_samples
        self._samples: dict[int, deque[float]] = {}

    def record(self, size: int, seconds: float) -> None:
        self._samples.setdefault(size_class(size), deque(maxlen=self.window)).append(seconds)

    def percentile(self, size: int, q: float) -> float | None:
        """The ``q`` quantile of this size's recent latencies; None until there are enough."""
        samples = self._samples.get(size_class(size))
        if samples is None or len(samples) < self.min_samples:
            return None
        ordered = sorted(samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
