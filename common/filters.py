"""The filters DPIP offers, in one registry.

The API validates a workload's filter and parameters against it, the worker applies it, ``dpip``
offers its names, and the OpenAPI description and the dashboard (through ``GET /filters``) list
it. Adding a filter is one decorated function here:

    @register("sepia", "warm brown tones", Param("strength", float, 1.0, 0.0, 1.0, "how much"))
    def sepia(im, params): ...

A filter is a pure function ``(Image, params) -> Image``: no sockets, no clocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from PIL import Image, ImageFilter

Apply = Callable[[Image.Image, dict], Image.Image]


@dataclass(frozen=True)
class Param:
    """A numeric parameter of a filter, with its default and its allowed range."""

    name: str
    type: type  # int or float
    default: float
    minimum: float
    maximum: float
    help: str

    def parse(self, raw: object) -> int | float:
        """The value of ``raw`` (text from a form, or a number), or ValueError saying why not."""
        try:
            value = self.type(raw) if not isinstance(raw, str) else self.type(raw.strip())
        except (TypeError, ValueError):
            shown = repr(raw) if len(repr(raw)) <= 40 else repr(raw)[:37] + "..."
            raise ValueError(f"{self.name} must be a number, got {shown}") from None
        if isinstance(value, float) and not math.isfinite(value) or not self.minimum <= value <= self.maximum:
            raise ValueError(f"{self.name} must be between {self.minimum:g} and {self.maximum:g}")
        return value

    def describe(self) -> dict:
        return {"name": self.name, "type": "integer" if self.type is int else "number",
                "default": self.default, "minimum": self.minimum, "maximum": self.maximum, "help": self.help}


@dataclass(frozen=True)
class FilterSpec:
    """One filter: its function, its parameters, and what its output looks like."""

    name: str
    apply: Apply
    params: tuple[Param, ...]
    help: str
    grayscale_output: bool = False  # the result is grayscale whatever the input (checked on upload)

    def validate(self, raw: Mapping[str, object]) -> dict[str, int | float]:
        """This filter's parameters from ``raw`` (others ignored), defaults filled in."""
        return {p.name: p.parse(raw[p.name]) if p.name in raw and raw[p.name] != "" else p.default
                for p in self.params}

    def describe(self) -> dict:
        return {"name": self.name, "help": self.help, "params": [p.describe() for p in self.params]}


REGISTRY: dict[str, FilterSpec] = {}
DEFAULT = "grayscale"


def register(name: str, help: str, *params: Param, grayscale_output: bool = False) -> Callable[[Apply], Apply]:
    """Add the decorated function to the registry under ``name``."""
    def add(fn: Apply) -> Apply:
        REGISTRY[name] = FilterSpec(name, fn, params, help, grayscale_output)
        return fn
    return add


def spec(name: str) -> FilterSpec:
    """The filter called ``name``, or ValueError listing the known ones."""
    found = REGISTRY.get(name)
    if found is None:
        shown = repr(name) if len(name) <= 40 else repr(name[:37]) + "..."
        raise ValueError(f"unknown filter {shown}; use one of: {', '.join(REGISTRY)}")
    return found


def param_names() -> frozenset[str]:
    """Every parameter name any filter takes."""
    return frozenset(p.name for s in REGISTRY.values() for p in s.params)


@register("grayscale", "luminance (ITU-R 601-2), keeping an alpha channel if there is one",
          grayscale_output=True)
def grayscale(im: Image.Image, params: dict) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        return im.convert("LA")
    return im.convert("L")


@register("blur", "Gaussian blur",
          Param("radius", float, 2.0, 0.0, 50.0, "the Gaussian's standard deviation, in pixels"))
def blur(im: Image.Image, params: dict) -> Image.Image:
    if im.mode in ("P", "1"):
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    return im.filter(ImageFilter.GaussianBlur(float(params.get("radius", 2.0))))
