"""The fleet's filters: what the live workers declared they run, checked against each other (a
name and version means one declaration), and looked up by the API (a workload's pipeline is
validated against every declaration it may run under), the scheduler and the result checks."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from common.logs import LogLimiter
from controller.workers import BUILTINS, WorkerInfo
from filtering import registry
from filtering.model import FilterSpec

logger = logging.getLogger(__name__)

#: Distinct filter names the live fleet may declare in all (a thousand workers declaring a
#: hundred made-up names each would otherwise make every listing of them hundreds of MB).
MAX_FLEET_FILTERS = 256


def declaration(name: str, declared: Mapping[str, FilterSpec] | None = None) -> FilterSpec | None:
    """Filter ``name`` as this server has it, else as ``declared`` (a worker's declarations) says."""
    return registry.REGISTRY.get(name) or (declared or {}).get(name)


class Catalog:
    """The filters of the live workers among ``workers`` (the membership's own dict, read live)."""

    def __init__(self, workers: Mapping[str, WorkerInfo]) -> None:
        self.workers = workers
        self.conflicts = 0  # declarations left out: unlike another worker's of that version, or too many
        self._log = LogLimiter(logger)

    def declared_by_a_worker(self, name: str) -> FilterSpec | None:
        """Filter ``name`` as a live worker declared it (the first found), or None."""
        for info in self.workers.values():
            if info.alive and info.filters is not None and name in info.filters:
                return info.filters[name]
        return None

    def declaration(self, name: str) -> FilterSpec | None:
        """Filter ``name`` as this server has it, else as a live worker declared it."""
        spec = self.declared_by_a_worker(name)
        return declaration(name, {name: spec} if spec is not None else None)

    def all_declarations(self, name: str) -> list[FilterSpec]:
        """Every declaration of filter ``name`` a job may be placed on: this server's own, else
        each distinct one of the live workers (a workload must suit all of them)."""
        own = registry.REGISTRY.get(name)
        if own is not None:
            return [own]
        out: list[FilterSpec] = []
        for info in self.workers.values():
            spec = info.filters.get(name) if info.alive and info.filters is not None else None
            if spec is not None and spec not in out:
                out.append(spec)
        return out

    def filter_names(self) -> list[str]:
        """This server's filters, then every other one a live worker runs."""
        return list(dict.fromkeys([*registry.REGISTRY, *sorted(self.fleet_filters())]))

    def of_worker(self, name: str) -> dict[str, FilterSpec] | None:
        """What worker ``name`` declared it runs (None: nothing known, or the built-ins)."""
        info = self.workers.get(name)
        return info.filters if info is not None else None

    def fleet_filters(self) -> dict[str, list[tuple[WorkerInfo, FilterSpec, bool]]]:
        """Every filter a live worker runs: who runs it, with its declaration there."""
        out: dict[str, list[tuple[WorkerInfo, FilterSpec, bool]]] = {}
        for info in self.workers.values():
            if not info.alive:
                continue
            if info.filters is None:
                for n in BUILTINS:
                    out.setdefault(n, []).append((info, registry.REGISTRY[n], False))
            else:
                for n, spec in info.filters.items():
                    out.setdefault(n, []).append((info, spec, n in info.gpu_filters))
        return out

    def without_conflicts(self, name: str, declared: dict[str, tuple[FilterSpec, bool]]
                           ) -> dict[str, tuple[FilterSpec, bool]]:
        """A worker's declarations less those that contradict another live worker's of the same
        filter name and version (one version of a plugin is one contract), and less new filter
        names past :data:`MAX_FLEET_FILTERS` fleet-wide; each left out is logged and counted."""
        fleet = {(n, spec.version): spec for n, held in self.fleet_filters().items()
                 for info, spec, _ in held if info.name != name}
        names = {n for n, _ in fleet}
        kept: dict[str, tuple[FilterSpec, bool]] = {}
        for n, (spec, gpu) in declared.items():
            other = fleet.get((n, spec.version))
            if other is not None and other != spec:
                self.conflicts += 1
                self._log.warning("conflict", "worker %s declares filter %s %s unlike the live workers that run"
                                  " it: left out there (%d so far)", name, n, spec.version or "(no version)",
                                  self.conflicts)
                continue
            if n not in names and len(names) >= MAX_FLEET_FILTERS:
                self.conflicts += 1
                self._log.warning("conflict", "worker %s declares filter %s past the fleet's %d: left out",
                                  name, n, MAX_FLEET_FILTERS)
                continue
            names.add(n)
            kept[n] = (spec, gpu)
        return kept
