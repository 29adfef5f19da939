"""A worker's filters on the wire: what it declares when it joins (:class:`~plane.wire.Joined`)
and what the server makes of a declaration (a :class:`~filtering.registry.FilterSpec` without a
function: the filter runs where it lives)."""

from __future__ import annotations

import logging

from filtering import model, registry
from plane import wire

logger = logging.getLogger(__name__)


def declaration_of(spec: model.FilterSpec, gpu: bool = False) -> wire.FilterDeclaration:
    params = []
    for p in spec.params:
        default = "" if p.default is None else repr(p.default) if isinstance(p.default, float) else str(p.default)
        params.append(wire.ParamDeclaration(p.name, model.TYPE_NAMES[p.type], default,
                                      float(p.minimum), float(p.maximum), list(p.choices), p.help[:200]))
    return wire.FilterDeclaration(spec.name, spec.version[:64], spec.help[:200], params, spec.colour, spec.size,
                            spec.output_format, gpu and spec.gpu)


#: What a worker's declaration may take of a message (sealed, it must fit MAX_MESSAGE_BYTES).
MAX_DECLARATION_BYTES = 384 * 1024


def of_registry(gpu: bool = False) -> list[wire.FilterDeclaration]:
    """Every filter of this process's registry (built-ins first, then plugins), as a worker
    declares them: at most MAX_FILTERS, and no more than fit one message (the rest are left out,
    and logged: a welcome that cannot be answered would keep the worker out for good)."""
    listed = [declaration_of(s, gpu) for s in registry.REGISTRY.values()]
    kept = listed[:wire.MAX_FILTERS]
    while kept and len(wire.encode(wire.Joined(kept))) > MAX_DECLARATION_BYTES:
        kept.pop()
    if len(kept) < len(listed):
        logger.warning("this worker runs %d filters but declares only the first %d (what fits a message):"
                       " %s are left out", len(listed), len(kept), ", ".join(o.name for o in listed[len(kept):]))
    return kept


def read(declaration: wire.FilterDeclaration) -> model.FilterSpec:
    """The declaration a worker sent, checked like a plugin's (ValueError if it is not one)."""
    params = []
    for p in declaration.params:
        d: dict = {"name": p.name, "type": p.type, "help": p.help}
        if p.type == "string":
            d.update(enum=list(p.choices), default=p.default or None)
        else:
            d.update(minimum=p.minimum, maximum=p.maximum)
            if p.default:
                try:
                    d["default"] = int(p.default) if p.type == "integer" else float(p.default)
                except ValueError:
                    raise ValueError(f"filter {declaration.name}: parameter {p.name}'s default") from None
        params.append(d)
    spec = model.FilterSpec.from_description({"name": declaration.name, "help": declaration.help, "params": params,
                                                "colour": declaration.colour, "size": declaration.size,
                                                "output_format": declaration.output_format, "version": declaration.version})
    return spec


def read_all(name: str, declared: list[wire.FilterDeclaration]) -> dict[str, tuple[model.FilterSpec, bool]]:
    """A worker's declarations by filter name, each with whether it runs on the worker's GPU;
    one it declared wrongly is left out (and logged)."""
    out: dict[str, tuple[model.FilterSpec, bool]] = {}
    for declaration in declared:
        try:
            out[declaration.name] = (read(declaration), declaration.gpu)
        except ValueError as e:
            logger.warning("worker %s declared a filter that cannot be used: %s", name, e)
    return out
