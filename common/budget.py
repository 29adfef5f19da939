"""A budget of bytes held in memory at once, for what holds a whole image when it can (a body
read whole, a download sent from memory) and streams it when the budget is spent."""

from __future__ import annotations


class ByteBudget:
    """``limit`` bytes, taken and given back by the event loop's thread only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        """Hold ``n`` bytes if they fit (then :meth:`give` them back), else False."""
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n
