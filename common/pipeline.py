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

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from common.filters import FILTER_NAME_RE, FilterSpec
from common.models import BadInput, quoted

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
            return json_steps(json.loads(text))
        except (ValueError, RecursionError) as e:
            raise PipelineError(f"filter is not valid JSON: {str(e)[:80]}") from None
    return raw_steps(text)


def validate(steps: list[tuple[str, Mapping]], catalog: Catalog, known: Callable[[], list[str]]) -> Pipeline:
    """The pipeline of ``steps``, each checked against its filter's declaration from
    ``catalog``; PipelineError naming the first step that is wrong (``known()`` lists the
    filters on offer, for the message)."""
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
    chosen = Pipeline(tuple(out))
    if len(chosen.steps) > 1 and len(chosen.text()) > MAX_TEXT:  # what jobs carry to the workers
        raise PipelineError(f"the pipeline, every parameter written out, is longer than {MAX_TEXT} characters")
    return chosen


def of_stored(filter_: str, params: Mapping) -> list[tuple[str, dict]]:
    """The steps of a workload's (or a job's) stored filter: its name and ``params``, or a
    pipeline's canonical text (parameters as text, checked again where they are used)."""
    if not is_pipeline(filter_):
        return [(filter_, dict(params))]
    return raw_steps(filter_)
