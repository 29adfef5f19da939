"""Whether an uploaded result can be its job's: judged by its header against the original's."""

from __future__ import annotations

from common import filters
from storage.images import StoredFile

GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La"}) | filters.DEEP_MODES
#: Where a format cannot say "grayscale" in its header, the modes a grayscale result may have:
#: a GIF is a palette (Pillow reads it as L only when its palette is exactly the gray ramp,
#: never with a transparent colour); a WebP is always RGB or RGBA to Pillow.
GRAYSCALE_RESULT_MODES = {"GIF": frozenset({"L", "P"}), "WEBP": frozenset({"RGB", "RGBA"})}


def result_problem(filter_name: str, original: tuple[str, int, int, str], result: StoredFile) -> str | None:
    """Why an uploaded result cannot be the job's (None if it may be): it keeps the original's
    format and size, and a grayscale result is grayscale while a blur of a colour image is not
    (as far as the format's header can say). (Header checks only: a worker that lies about
    pixels can spoil only the jobs it was sent.)"""
    fmt, width, height, mode = original
    if result.format != fmt:
        return f"a {result.format} result for a {fmt} original"
    if (result.width, result.height) != (width, height):
        return f"{result.width}x{result.height} result for a {width}x{height} original"
    gray = filters.spec(filter_name).grayscale_output
    if gray and result.mode not in GRAYSCALE_RESULT_MODES.get(fmt, GRAYSCALE_MODES):
        return f"a {result.mode} result is not grayscale"
    if not gray and mode not in GRAYSCALE_MODES and result.mode in GRAYSCALE_MODES:
        return f"a grayscale result for {filter_name} of a colour image"
    return None
