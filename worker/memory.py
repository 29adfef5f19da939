"""Giving a big job's memory back to the system once it has ended.

Pillow and NumPy allocate an image's pixels with malloc. glibc keeps what a thread freed in that
thread's arena for reuse, so after one 50-megapixel job a worker would stay at its peak size
until the same thread needed as much again: an idle worker that looks like it holds gigabytes.
``malloc_trim(0)`` returns the free pages of every arena; it costs about a millisecond, so it is
called after jobs that ran long (which are the ones that held many pixels), not after each one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

logger = logging.getLogger(__name__)


def _libc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


_TRIM = _libc_trim()


def give_back() -> None:
    """Collect cycles (a traceback's frames may hold images), then return free memory."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
