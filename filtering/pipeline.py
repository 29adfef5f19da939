"""Pipelines: a workload's filter as a chain of up to :data:`MAX_STEPS` filters of the registry.

Written ``step|step|...``, each step ``name`` or ``name(key=value,...)``, e.g.
``resize(width=800)|sharpen|grayscale``; or in JSON as an array of ``{"name", "params"}``. A
pipeline is validated whole (every step's name and parameters, against the filter's declaration:
the server's own, or the one a worker sent) before anything is created, and an error names the
step. The worker runs the steps on each frame in one decode and one encode.

A pipeline of one step is stored and sent as the course's ``filter`` name plus ``params`` (as a
workload always was); a longer one as its canonical text, every parameter written out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from common.models import BadInput, Limits, json_loads, quoted
from filtering.model import FILTER_NAME_RE, FilterSpec

MAX_STEPS = 10
#: The longest pipeline text taken (ten steps of a few parameters fit in far less).
MAX_TEXT = 1024
#: A parameter's value as text: a number or a word.
_VALUE_RE = re.compile(r"[A-Za-z0-9._+-]{1,32}")
_STEP_RE = re.compile(r"\s*([A-Za-z][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*", re.S)

#: Looks a filter up by name: its declaration, or None if nobody offers it.
Catalog = Callable[[str], FilterSpec | None]


class PipelineError(BadInput):
    """A pipeline that cannot be run; the message names the step."""


class TooCostly(PipelineError):
    """A step would make an image over the pixel limit, or the pipeline would cost more than
    its budget; the message names the step."""


class Meter:
    """Counts what a job's steps cost as they run, and refuses one before it runs when it would
    make too large an image or pass the budget. Pure: sizes in, sizes out."""

    def __init__(self, limits: Limits, frames: int = 1) -> None:
        self.limits = limits
        self.frames = frames  # each step counted this many times (frames alike, told at once)
        self.spent = 0

    def before(self, where: str, spec: FilterSpec | None, values: Mapping, width: int, height: int
               ) -> tuple[int, int] | None:
        """The size step ``where`` will make of a ``width`` x ``height`` image (None: only known
        once it ran), counted; :class:`TooCostly` if it must not run."""
        out: tuple[int, int] | None = (width, height)
        if spec is None or spec.size != "same":
            out = spec.dims(width, height, dict(values)) if spec is not None and spec.dims is not None else None
        if out is not None and out[0] * out[1] > self.limits.max_pixels:
            raise TooCostly(f"{where} would make a {out[0]}x{out[1]} image of a {width}x{height} one: more than"
                            f" the limit of {self.limits.max_pixels} pixels")
        self._spend(where, max(width * height, out[0] * out[1] if out is not None else 0))
        return out

    def after(self, where: str, predicted: tuple[int, int] | None, width: int, height: int) -> None:
        """What a step made that could not be told beforehand (a plugin's), checked and counted."""
        if predicted is not None:
            return
        if width * height > self.limits.max_pixels:
            raise TooCostly(f"{where} made a {width}x{height} image: more than the limit of"
                            f" {self.limits.max_pixels} pixels")
        self._spend(where, width * height)

    def _spend(self, where: str, pixels: int) -> None:
        self.spent += pixels * self.frames
        if self.spent > self.limits.max_pixel_steps:
            raise TooCostly(f"{where}: the pipeline would take more than {self.limits.max_pixel_steps}"
                            " pixel-steps (each step's pixels, over every step and frame)")


def step_name(i: int, name: str, steps: int) -> str:
    """How an error names a step: by its place in a pipeline, or by its name alone."""
    return f"step {i} ({name})" if steps > 1 else name


def cost_problem(steps: list[tuple[FilterSpec | None, Mapping]], width: int, height: int, limits: Limits,
                 frames: int = 1) -> str | None:
    """Why ``steps`` must not run on ``frames`` frames of ``width`` x ``height`` (None: they
    may, as far as can be told before a step whose output size only its worker knows)."""
    meter = Meter(limits, frames)
    try:
        for i, (spec, values) in enumerate(steps, 1):
            size = meter.before(step_name(i, spec.name if spec else "?", len(steps)), spec, values, width, height)
            if size is None:
                return None
            width, height = size
    except TooCostly as e:
        return str(e)
    return None


@dataclass(frozen=True)
class Step:
    name: str
    params: Mapping[str, int | float | str]

    def text(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}({','.join(f'{k}={_written(v)}' for k, v in self.params.items())})"


@dataclass(frozen=True)
class Pipeline:
    steps: tuple[Step, ...]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(s.name for s in self.steps)

    def text(self) -> str:
        """The canonical text: every parameter written out."""
        return "|".join(s.text() for s in self.steps)

    def stored(self) -> tuple[str, dict]:
        """(filter, params) as a workload keeps them: one step is its name and parameters."""
        if len(self.steps) == 1:
            return self.steps[0].name, dict(self.steps[0].params)
        return self.text(), {}

    def label(self) -> str:
        """A bounded name for metrics and capabilities: the filter, or "pipeline"."""
        return self.steps[0].name if len(self.steps) == 1 else "pipeline"

    def to_json(self) -> list[dict]:
        return [{"name": s.name, "params": dict(s.params)} for s in self.steps]


def _written(value: int | float | str) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def is_pipeline(text: str) -> bool:
    """Whether a stored filter is a pipeline's text rather than one filter's name."""
    return not FILTER_NAME_RE.fullmatch(text)


def label_of(stored_filter: str) -> str:
    return "pipeline" if is_pipeline(stored_filter) else stored_filter


def raw_steps(text: str) -> list[tuple[str, dict[str, str]]]:
    """The steps of a pipeline's text, their parameters still text; PipelineError if malformed."""
    if len(text) > MAX_TEXT:
        raise PipelineError(f"filter is longer than {MAX_TEXT} characters")
    parts = text.split("|")
    if len(parts) > MAX_STEPS:
        raise PipelineError(f"a pipeline has at most {MAX_STEPS} steps, got {len(parts)}")
    steps = []
    for i, part in enumerate(parts, 1):
        m = _STEP_RE.fullmatch(part)
        if not m:
            raise PipelineError(f"step {i} ({quoted(part.strip(), 40)}): write name or name(key=value,...)")
        name, inside = m.group(1).lower(), m.group(2)
        params: dict[str, str] = {}
        for item in (inside.split(",") if inside and inside.strip() else []):
            key, eq, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not eq or not FILTER_NAME_RE.fullmatch(key) or not _VALUE_RE.fullmatch(value):
                raise PipelineError(f"step {i} ({name}): {quoted(item.strip(), 40)} is not key=value"
                                    " (a number or a word)")
            if key in params:
                raise PipelineError(f"step {i} ({name}): {key} given twice")
            params[key] = value
        steps.append((name, params))
    return steps


def json_steps(value: object) -> list[tuple[str, dict]]:
    """The steps of a JSON pipeline: an array of ``{"name", "params"}`` (or one such object)."""
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items:
        raise PipelineError("a JSON filter is an array of {\"name\", \"params\"}")
    if len(items) > MAX_STEPS:
        raise PipelineError(f"a pipeline has at most {MAX_STEPS} steps, got {len(items)}")
    steps = []
    for i, item in enumerate(items, 1):
        name = item.get("name") if isinstance(item, dict) else None
        params = item.get("params", {}) if isinstance(item, dict) else None
        if not isinstance(name, str) or not isinstance(params, dict) or len(params) > 16:
            raise PipelineError(f"step {i}: an object with a name and at most 16 params")
        if not all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in params.values()):
            raise PipelineError(f"step {i} ({quoted(name, 40)}): parameters are numbers or words")
        steps.append((name.strip().lower(), params))
    return steps


def parse(raw: str) -> list[tuple[str, dict]]:
    """The steps a client wrote: pipeline text, or JSON (an array, or one object)."""
    text = raw.strip()
    if text[:1] in "[{" and text:
        if len(text) > 8 * MAX_TEXT:
            raise PipelineError(f"filter is longer than {8 * MAX_TEXT} characters")
        try:
            return json_steps(json_loads(text))
        except (ValueError, RecursionError) as e:
            raise PipelineError(f"filter is not valid JSON: {str(e)[:80]}") from None
    return raw_steps(text)


def validate(steps: list[tuple[str, Mapping]], catalog: Catalog, known: Callable[[], list[str]],
             limits: Limits | None = None, every: Callable[[str], list[FilterSpec]] | None = None) -> Pipeline:
    """The pipeline of ``steps``, each checked against its filter's declaration from
    ``catalog``; PipelineError naming the first step that is wrong (``known()`` lists the
    filters on offer, for the message). With ``limits``, one that would make too large an image
    or cost too much even of a 1x1 image is refused (:class:`TooCostly`). With ``every``, a
    step is checked against each declaration of its filter it may run under (the workers'
    versions of a plugin), and must suit them all."""
    out = []
    for i, (name, params) in enumerate(steps, 1):
        spec = catalog(name) if FILTER_NAME_RE.fullmatch(name) else None
        if spec is None:
            where = f"step {i} ({quoted(name, 40)})" if len(steps) > 1 else f"filter {quoted(name, 40)}"
            raise PipelineError(f"unknown {where}: no live worker offers it; use one of: {', '.join(known())}")
        unknown = sorted(set(params) - {p.name for p in spec.params})
        if unknown:
            raise PipelineError(f"step {i} ({name}) takes no parameter {unknown[0]!r}"
                                f" ({', '.join(p.name for p in spec.params) or 'it takes none'})")
        try:
            out.append(Step(name, spec.validate(params)))
        except ValueError as e:
            raise PipelineError(f"step {i} ({name}): {e}") from None
        for other in (every(name) if every is not None else ()):
            try:
                other.validate(params)
            except ValueError as e:
                raise PipelineError(f"step {i} ({name}): {e} (as version {other.version or '?'} on a live worker"
                                    " declares it)") from None
    chosen = Pipeline(tuple(out))
    if len(chosen.steps) > 1 and len(chosen.text()) > MAX_TEXT:  # what jobs carry to the workers
        raise PipelineError(f"the pipeline, every parameter written out, is longer than {MAX_TEXT} characters")
    if limits is not None:  # what it does to the smallest image (1x1) is known now: a bomb for any input
        problem = cost_problem([(catalog(s.name), s.params) for s in chosen.steps], 1, 1, limits)
        if problem:
            raise TooCostly(problem)
    return chosen


def of_stored(filter_: str, params: Mapping) -> list[tuple[str, dict]]:
    """The steps of a workload's (or a job's) stored filter: its name and ``params``, or a
    pipeline's canonical text (parameters as text, checked again where they are used)."""
    if not is_pipeline(filter_):
        return [(filter_, dict(params))]
    return raw_steps(filter_)


class Plans:
    """The server's check of an upload against its workload's pipeline (:func:`cost_problem`
    for the image's size and frames), each pipeline's steps resolved once and kept."""

    MAX = 512

    def __init__(self, catalog: Catalog, limits: Limits) -> None:
        self.catalog = catalog
        self.limits = limits
        self._steps: dict[tuple, list[tuple[FilterSpec | None, Mapping]]] = {}

    def problem(self, filter_: str, params: Mapping, width: int, height: int, frames: int = 1) -> str | None:
        """Why an image of that size cannot go through that pipeline, or None."""
        key = (filter_, tuple(sorted(params.items())))
        steps = self._steps.get(key)
        if steps is None:
            steps = []
            for name, raw in of_stored(filter_, params):
                spec = self.catalog(name)
                try:
                    steps.append((spec, spec.validate(raw) if spec is not None else raw))
                except ValueError:
                    steps.append((None, raw))  # checked where it runs
            if len(self._steps) >= self.MAX:
                self._steps.clear()
            self._steps[key] = steps
        if len(steps) * width * height * frames <= self.limits.max_pixel_steps and \
                all(spec is not None and spec.size == "same" for spec, _ in steps):
            return None  # (most workloads: nothing grows, well within the budget)
        return cost_problem(steps, width, height, self.limits, frames)


def steps_json(filter_: str, params: dict) -> list[dict]:
    """A workload's pipeline as ``[{"name", "params"}]`` (one step for the course's filters)."""
    try:
        steps = of_stored(filter_, params)
    except PipelineError:
        return [{"name": filter_, "params": params}]
    return [{"name": n, "params": {k: _number(v) for k, v in p.items()}} for n, p in steps]


def _number(value: object) -> object:
    """A parameter read back from a pipeline's text: a number if it is one."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            continue
        return number if number == number and abs(number) != float("inf") else value
    return value
