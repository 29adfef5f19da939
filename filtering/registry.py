"""The filters a process runs, by name: the built-ins (:mod:`filtering.builtins`, registered
when :mod:`filtering` is imported) and the plugins of installed packages, found through the
``dpip.filters`` entry-point group (:func:`load_plugins`). The API validates a workload's
pipeline against it (with the workers' declarations), the worker applies it, ``GET /filters``
lists it."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable
from dataclasses import replace

from common import models
from filtering.builtins import BUILTIN_FILTERS
from filtering.model import FilterSpec, _shown

logger = logging.getLogger(__name__)

#: The entry-point group plugins register their filters under.
ENTRY_POINT_GROUP = "dpip.filters"
#: The two filters of the course; a bodiless POST /workloads means the first.
COURSE = models.COURSE

#: Every filter this process runs, by name: the built-ins, then the plugins :func:`load_plugins` adds.
REGISTRY: dict[str, FilterSpec] = {s.name: replace(s, builtin=True) for s in BUILTIN_FILTERS}
DEFAULT = "grayscale"


def spec(name: str) -> FilterSpec:
    """The filter called ``name``, or ValueError listing the known ones."""
    found = REGISTRY.get(name)
    if found is None:
        raise ValueError(f"unknown filter {_shown(name)}; use one of: {', '.join(REGISTRY)}")
    return found


def param_names(names: Iterable[str] = COURSE) -> frozenset[str]:
    """Every parameter name the filters ``names`` take (the course's two by default: the
    parameters a form may give beside ``filter``)."""
    return frozenset(p.name for n in names if n in REGISTRY for p in REGISTRY[n].params)


# -- plugins ------------------------------------------------------------------------------------

_loaded: set[str] = set()


def load_plugins(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Register every filter the installed packages offer under ``group`` (once a process);
    return one line for each that could not be (it failed to import, is not a filter, or takes
    a taken name), each also logged. A broken plugin costs its own filters, never the process."""
    problems: list[str] = []
    if group in _loaded:
        return problems
    _loaded.add(group)
    for ep in importlib.metadata.entry_points(group=group):
        where = f"plugin {ep.name} ({ep.value})"
        try:
            found = ep.load()
        except Exception as e:  # anything a plugin's import may raise
            problems.append(f"{where} failed to import, skipped: {type(e).__name__}: {str(e)[:120]}")
            continue
        specs = found if isinstance(found, (list, tuple)) else [found]
        version = ep.dist.version if ep.dist is not None else ""
        for s in specs:
            if not isinstance(s, FilterSpec) or s.apply is None:
                problems.append(f"{where} is not a filter made with dpip.filters.define, skipped")
            elif s.name in REGISTRY:
                problems.append(f"{where}: a filter named {s.name!r} is already "
                                f"{'built in' if REGISTRY[s.name].builtin else 'offered by another plugin'}, skipped")
            else:
                REGISTRY[s.name] = replace(s, version=version or s.version, builtin=False)
    for line in problems:
        logger.warning("%s", line)
    return problems
