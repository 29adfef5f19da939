"""Rate-limited logging for what peers can provoke: a flood of bad messages costs a few lines,
not a full disk."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class LogLimiter:
    """At most ``burst`` lines per ``per`` seconds per category; the next line that gets through
    says how many were suppressed. Categories are our own fixed words, never peer input, so the
    table stays small."""

    def __init__(self, logger: logging.Logger, burst: int = 5, per: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.per = per
        self.clock = clock
        self._windows: dict[str, tuple[float, int, int]] = {}  # category -> (start, lines, dropped)

    def log(self, level: int, category: str, fmt: str, *args: object, exc_info: bool = False) -> bool:
        """Log unless ``category`` has used its lines in this window; True if logged."""
        now = self.clock()
        start, lines, dropped = self._windows.get(category, (now, 0, 0))
        if now - start >= self.per:
            start, lines = now, 0
        if lines >= self.burst:
            self._windows[category] = (start, lines, dropped + 1)
            return False
        if dropped:
            fmt += " (%d similar lines suppressed)"
            args = (*args, dropped)
        self._windows[category] = (start, lines + 1, 0)
        self.logger.log(level, fmt, *args, exc_info=exc_info)
        return True

    def warning(self, category: str, fmt: str, *args: object) -> bool:
        return self.log(logging.WARNING, category, fmt, *args)
