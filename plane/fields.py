"""The bounds of the worker plane's message fields, declared beside each field of
:mod:`plane.wire` (a dataclass field's metadata) and enforced as a message is decoded."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import field
from typing import Any

from common import models

#: Names of workers and tags follow the workload-name rule (:data:`common.models.NAME_RE`).
NAME_RE = models.NAME_RE
#: Tags a worker has, or a workload needs, at most.
MAX_TAGS = 32
HEX_RE = re.compile(r"[0-9a-f]{0,128}")
MAX_INT = 2**53  # the largest integer every JSON reader agrees on
MAX_LIST = 4096
#: An http(s) URL without whitespace ("" allowed).
URL_RE = re.compile(r"(https?://[^\s]{1,4080})?")
MAX_TEXT = 256


def _bounds(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A dataclass field with validation rules for :func:`decode` (``lo``, ``hi``, ``max_len``,
    ``pattern``, ``max_items``)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


def name_field(default: Any = dataclasses.MISSING) -> Any:
    return _bounds(default, pattern=NAME_RE)


def hex_field(default: Any = dataclasses.MISSING) -> Any:
    return _bounds(default, pattern=HEX_RE)


def text(default: Any = dataclasses.MISSING, max_len: int = MAX_TEXT) -> Any:
    return _bounds(default, max_len=max_len)


def number(default: Any = dataclasses.MISSING, lo: float = 0, hi: float = MAX_INT) -> Any:
    return _bounds(default, lo=lo, hi=hi)


def percent(default: Any = 0.0) -> Any:
    return _bounds(default, lo=0.0, hi=100.0)
