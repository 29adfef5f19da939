"""Whether an uploaded result can be its job's: judged by its header against the original's and
what the job's pipeline declares of its output (format, size, colours)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from filtering import builtins as operations
from filtering import model, pipeline
from imaging import formats
from controller.catalog import declaration
from storage.images import ReceivedImage

GRAYSCALE_MODES, GRAYSCALE_RESULT_MODES = formats.GRAYSCALE_MODES, formats.GRAYSCALE_RESULT_MODES

#: What a worker declared it runs, by filter name (see controller.catalog). A result is judged
#: by the server's own filter, else by the declaration of the worker that ran the job (so a
#: worker that declares loosely loosens only the checks of its own results).
Declared = Mapping[str, model.FilterSpec]


@dataclass(frozen=True)
class Expected:
    """What a job's result must look like: its format; its size, if the pipeline keeps it;
    grayscale (True), not grayscale (False), or either (None)."""

    format: str
    size: tuple[int, int] | None
    gray: bool | None


def expected(filter_: str, params: Mapping, original: tuple[str, int, int, str],
             declared: Declared | None = None) -> Expected:
    """What the steps of ``filter_`` (with ``params``) make of ``original``; ``declared``: the
    running worker's declarations of filters this server does not have."""
    fmt, width, height, mode = original
    try:
        steps = pipeline.of_stored(filter_, params)
    except pipeline.PipelineError:
        steps = []
    size: tuple[int, int] | None = (width, height)
    colour = "gray" if mode in GRAYSCALE_MODES else "colour"
    for name, values in steps:
        spec = declaration(name, declared)
        if spec is None:  # nobody declared it: nothing but the format is known
            size, colour = None, "any"
            continue
        if spec.size != "same":
            size = None
        if spec.colour == "gray":
            colour = "gray"
        elif spec.colour == "any":
            colour = "any"
        if spec.output_format:
            kind = str(values.get("type", "png")).strip().lower()
            fmt = operations.OUTPUT_FORMATS.get(kind, fmt)
    return Expected(fmt, size, {"gray": True, "colour": False}.get(colour))


def result_problem(filter_: str, original: tuple[str, int, int, str], result: ReceivedImage,
                   params: Mapping | None = None, declared: Declared | None = None) -> str | None:
    """Why an uploaded result cannot be the job's (None if it may be): it has the format the
    pipeline makes (the original's unless a format step chose another), the original's size
    unless a step changes it, a grayscale result is grayscale while a colour image's result
    through steps that keep colours is not (as far as the format's header can say). (Header
    checks only: a worker that lies about pixels can spoil only the jobs it was sent.)"""
    want = expected(filter_, params or {}, original, declared)
    fmt, width, height, _ = original
    if result.format != want.format:
        return f"a {result.format} result for a {fmt} original" + (
            f" (the pipeline makes {want.format})" if want.format != fmt else "")
    if want.size is not None and (result.width, result.height) != want.size:
        return f"{result.width}x{result.height} result for a {width}x{height} original"
    label = pipeline.label_of(filter_)
    if want.gray and result.mode not in GRAYSCALE_RESULT_MODES.get(want.format, GRAYSCALE_MODES):
        return f"a {result.mode} result is not grayscale"
    if want.gray is False and result.mode in GRAYSCALE_MODES:
        return f"a grayscale result for {label} of a colour image"
    return None
