"""The model every filter is written in: a :class:`FilterSpec` (a pure function with a name, a
help line, typed and bounded :class:`Param` s and a declaration of what its output looks like),
made with :func:`define`. Plugins use it through :mod:`dpip.filters`; the registry of the
filters a process runs is :mod:`filtering.registry`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from PIL import Image

from filtering.kernels import run_kernel

Apply = Callable[[Image.Image, dict], Image.Image]
#: ``(width, height, params) -> (width, height)``: the size of a filter's output for an input of
#: that size, known before it runs (so a step that would make too large an image is refused
#: before anything is allocated).
Dims = Callable[[int, int, dict], tuple[int, int]]
#: ``(xp, array of height x width x 3 uint8, params) -> array of the same shape``
Kernel = Callable[..., object]

#: What a filter's (and a parameter's) name may be.
FILTER_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: What a filter says of its output's colours: keeps them (gray stays gray, colour stays
#: colour), makes it grayscale, or makes it anything (sepia turns gray into colour).
COLOURS = ("keeps", "gray", "any")
#: What a filter says of its output's size: the input's, or another (resize, crop, rotate).
SIZES = ("same", "changes")
MAX_PARAMS = 16
#: A parameter's type as descriptions (and the wire) name it.
TYPE_NAMES: dict[type, str] = {int: "integer", float: "number", str: "string"}
MAX_CHOICES = 16
MAX_HELP = 200


@dataclass(frozen=True)
class Param:
    """A parameter of a filter: an integer or a number within bounds, or one of a few words.
    A default of None makes it optional (the filter decides what its absence means)."""

    name: str
    type: type  # int, float or str (then ``choices`` lists the words)
    default: int | float | str | None
    minimum: float = 0
    maximum: float = 0
    help: str = ""
    choices: tuple[str, ...] = ()

    def parse(self, raw: object) -> int | float | str:
        """The value of ``raw`` (text from a form, or a number), or ValueError saying why not."""
        if self.type is str:
            word = raw.strip().lower() if isinstance(raw, str) else raw
            if word not in self.choices:
                raise ValueError(f"{self.name} must be one of {', '.join(self.choices)}, got {_shown(raw)}")
            return word
        value = _number(raw, self.type)
        if value is None:
            raise ValueError(f"{self.name} must be {'an integer' if self.type is int else 'a number'},"
                             f" got {_shown(raw)}")
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{self.name} must be between {self.minimum:g} and {self.maximum:g}")
        return value

    def describe(self) -> dict:
        out: dict = {"name": self.name, "type": TYPE_NAMES[self.type],
                     "default": self.default}
        if self.type is str:
            out["enum"] = list(self.choices)
        else:
            out.update(minimum=self.minimum, maximum=self.maximum)
        out["help"] = self.help
        return out

    @classmethod
    def from_description(cls, d: Mapping) -> "Param":
        """A parameter as another process described it (:meth:`describe`), or ValueError."""
        kind = {v: k for k, v in TYPE_NAMES.items()}.get(d.get("type"))  # type: ignore[arg-type]
        name = d.get("name")
        if kind is None or not isinstance(name, str) or not FILTER_NAME_RE.fullmatch(name):
            raise ValueError(f"a parameter described as {_shown(dict(d))}")
        help_ = str(d.get("help", ""))[:MAX_HELP]
        if kind is str:
            choices = tuple(d.get("enum") or ())
            if not 0 < len(choices) <= MAX_CHOICES or not all(isinstance(c, str) and FILTER_NAME_RE.fullmatch(c)
                                                              for c in choices):
                raise ValueError(f"parameter {name}: its choices")
            default = d.get("default")
            return cls(name, str, default if default in choices else None, help=help_, choices=choices)
        low, high, default = d.get("minimum"), d.get("maximum"), d.get("default")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)) \
                or low > high:
            raise ValueError(f"parameter {name}: its bounds")
        if default is not None and not (isinstance(default, (int, float)) and low <= default <= high):
            default = None
        return cls(name, kind, default, low, high, help_)


@dataclass(frozen=True)
class FilterSpec:
    """One filter: its function, its parameters, and what its output looks like."""

    name: str
    apply: Apply | None  # None: known from a worker's description only (run where it lives)
    params: tuple[Param, ...]
    help: str
    colour: str = "keeps"  # one of COLOURS
    size: str = "same"  # one of SIZES
    output_format: bool = False  # its "type" parameter chooses the result's format
    kernel: Kernel | None = field(default=None, compare=False)  # an array implementation (GPU or CPU)
    check: Callable[[dict], None] | None = field(default=None, compare=False)  # a rule over all its params
    dims: Dims | None = field(default=None, compare=False)  # its output's size, known beforehand
    version: str = ""  # the plugin's (its distribution's); "" for a built-in
    builtin: bool = False

    @property
    def gpu(self) -> bool:
        """It has an array kernel, which runs on a GPU where the worker has one."""
        return self.kernel is not None

    def validate(self, raw: Mapping[str, object]) -> dict[str, int | float | str]:
        """This filter's parameters from ``raw`` (others ignored), defaults filled in (an
        optional one left out), or ValueError naming the parameter."""
        out = {}
        for p in self.params:
            if p.name in raw and raw[p.name] != "":
                out[p.name] = p.parse(raw[p.name])
            elif p.default is not None:
                out[p.name] = p.default
        if self.check is not None:
            self.check(out)
        return out

    def describe(self) -> dict:
        return {"name": self.name, "help": self.help, "params": [p.describe() for p in self.params],
                "colour": self.colour, "size": self.size, "output_format": self.output_format,
                "gpu": self.gpu, "version": self.version, "builtin": self.builtin}

    @classmethod
    def from_description(cls, d: Mapping) -> "FilterSpec":
        """A filter as a worker described it (no function: it runs there), or ValueError."""
        name = d.get("name")
        if not isinstance(name, str) or not FILTER_NAME_RE.fullmatch(name):
            raise ValueError(f"a filter named {_shown(name)}")
        params = d.get("params") or []
        if not isinstance(params, list) or len(params) > MAX_PARAMS:
            raise ValueError(f"filter {name}: its parameters")
        colour, size = d.get("colour", "keeps"), d.get("size", "same")
        if colour not in COLOURS or size not in SIZES:
            raise ValueError(f"filter {name}: its output")
        return cls(name, None, tuple(Param.from_description(p) for p in params), str(d.get("help", ""))[:MAX_HELP],
                   colour, size, bool(d.get("output_format")), version=str(d.get("version", ""))[:64])


#: How numbers are written: ASCII decimal digits, a sign, a point and an exponent (a float's).
#: Not Python's wider grammar (``1_0``, full-width digits, ``inf``, ``nan``, spaces inside).
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,18}")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]{1,18}(?:\.[0-9]{0,18})?|\.[0-9]{1,18})(?:[eE][+-]?[0-9]{1,3})?")


def _number(raw: object, kind: type) -> int | float | None:
    """``raw`` (text, or a number from JSON) as an integer (``kind`` int: an integral value
    only) or a finite float that is not subnormal (-0.0 is 0.0); None if it is not one."""
    if isinstance(raw, str):
        text = raw.strip()
        if not (_INT_TEXT if kind is int else _FLOAT_TEXT).fullmatch(text):
            return None
        raw = int(text) if kind is int else float(text)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return None
    if kind is int:
        return raw if isinstance(raw, int) else None  # 100.5, and 1e2 from JSON, are no integers
    value = float(raw)
    if not math.isfinite(value) or (value != 0 and abs(value) < 2.2250738585072014e-308):
        return None
    return value + 0.0  # -0.0 becomes 0.0


def _shown(raw: object) -> str:
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def define(name: str, help: str, *params: Param, colour: str = "keeps", size: str = "same",
           output_format: bool = False, kernel: bool = False, pointwise: bool = False,
           check: Callable[[dict], None] | None = None, dims: Dims | None = None) -> Callable[[Callable], FilterSpec]:
    """Make the decorated function a filter (not registered: a plugin's entry point names it).
    With ``kernel=True`` the function is ``(xp, rgb, params) -> rgb`` on arrays (see
    :func:`run_kernel`); ``pointwise=True`` says each output pixel depends on its input pixel
    only, so the kernel is given the image a band of rows at a time (its arrays stay small).
    A filter with ``size="changes"`` should give ``dims``, the size it makes: the worker then
    refuses a step that would pass the pixel limit before running it."""
    if not FILTER_NAME_RE.fullmatch(name) or colour not in COLOURS or size not in SIZES:
        raise ValueError(f"filter {name!r}: a name of {FILTER_NAME_RE.pattern}, colour in {COLOURS},"
                         f" size in {SIZES}")
    if len(params) > MAX_PARAMS or len({p.name for p in params}) != len(params):
        raise ValueError(f"filter {name!r}: at most {MAX_PARAMS} parameters, each named once")

    def make(fn: Callable) -> FilterSpec:
        if kernel:
            return FilterSpec(name, lambda im, p: run_kernel(fn, im, p, pointwise=pointwise), params, help, colour,
                              size, output_format, kernel=fn, check=check, dims=dims)
        return FilterSpec(name, fn, params, help, colour, size, output_format, check=check, dims=dims)
    return make
