"""The benchmarks' shared parts: per-image latencies from the server's own timestamps, and the
table of figures against their targets that every benchmark ends with."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path


def latencies_ms(db: Path, workload_id: str) -> list[float]:
    """Per image, original stored -> filtered stored, from the server's own timestamps."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT f.created_at - o.created_at FROM images o JOIN images f"
            " ON f.workload_id = o.workload_id AND f.image_id = o.image_id"
            " WHERE o.workload_id = ? AND o.type = 'original' AND f.type = 'filtered'",
            (workload_id,),
        ).fetchall()
    return sorted(r[0] * 1000 for r in rows)


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@dataclass(frozen=True)
class Row:
    """A line of the final table: a figure, its target and whether it meets it."""

    figure: str
    value: float
    unit: str  # "img/s", "ms", or "" for a ratio
    target: float | None  # None: a figure shown for comparison, with no target
    at_least: bool  # the target is a floor (else a ceiling)
    detail: str = ""

    @property
    def meets(self) -> bool:
        if self.target is None:
            return True
        return self.value >= self.target if self.at_least else self.value <= self.target

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "-"
        return f"{'>=' if self.at_least else '<='} {self.target:g} {self.unit}".rstrip()

    @property
    def judgement(self) -> str:
        """E.g. ``target <= 20 ms: meets``, for the printed lines."""
        return f"target {self.target_text}: {'meets' if self.meets else 'MISSES'}"

    def cells(self) -> list[str]:
        measured = f"{self.value:.{1 if self.unit else 2}f} {self.unit}".rstrip()
        if self.detail:
            measured += f" ({self.detail})"
        verdict = "-" if self.target is None else "meets" if self.meets else "MISSES"
        return [self.figure, measured, self.target_text, verdict]


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table."""
    cells = [["figure", "measured", "target", "verdict"], *(r.cells() for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
