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


#: Modes of more than 8 bits a band (16- and 32-bit integers, 32-bit floats): all grayscale.
DEEP_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})


@register("grayscale", "luminance (ITU-R 601-2), keeping an alpha channel if there is one",
          grayscale_output=True)
def grayscale(im: Image.Image, params: dict) -> Image.Image:
    if im.mode in DEEP_MODES:
        return im.copy()  # gray already, at its own depth (an 8-bit L would clip it at 255)
    if im.mode == "LAB":
        return im.getchannel("L")  # its lightness (Pillow converts LAB to nothing else)
    if im.mode == "HSV":
        im = im.convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:  # a colour marked transparent too
        return im.convert("LA")
    return im.convert("L")


#: Modes GaussianBlur does not take, and the mode each is blurred in (a palette decoded).
_BLURRED_AS = {"1": "L", "P": "RGB", "PA": "RGBA", "HSV": "RGB"}


@register("blur", "Gaussian blur",
          Param("radius", float, 2.0, 0.0, 50.0, "the Gaussian's standard deviation, in pixels"))
def blur(im: Image.Image, params: dict) -> Image.Image:
    gaussian = ImageFilter.GaussianBlur(float(params.get("radius", 2.0)))
    mode = im.mode
    if mode in DEEP_MODES:
        return _deep_blur(im, gaussian)
    if mode in ("LAB", "YCbCr"):  # GaussianBlur refuses them: band by band, as it does RGB
        return Image.merge(mode, [band.filter(gaussian) for band in im.split()])
    if "transparency" in im.info:  # a colour (or palette entry) marked transparent: blurred as alpha
        im = im.convert("LA" if mode in ("1", "L", "LA") else "RGBA")
    elif mode in _BLURRED_AS:
        im = im.convert(_BLURRED_AS[mode])
    out = im.filter(gaussian)
    return out.convert(mode) if mode == "HSV" else out


def _deep_blur(im: Image.Image, gaussian: ImageFilter.GaussianBlur) -> Image.Image:
    """GaussianBlur takes 8-bit bands only: the image's own range of values is spread over 256
    levels, blurred, and mapped back into its mode. Exact for integers within 256 values of
    each other; otherwise to 1/255 of the image's range (its values are never clipped)."""
    values = im.convert("F")  # (Pillow finds no extrema of an I;16B image)
    low, high = values.getextrema()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("it has infinite values, which a blur cannot spread")
    step = (high - low) / 255 if im.mode == "F" or high - low > 255 else 1
    step = step or 1  # a flat image
    levels = values.point(lambda v: (v - low) / step + 0.5).convert("L")  # rounded
    back = levels.filter(gaussian).convert("F").point(lambda v: v * step)
    if im.mode == "F":
        return back.point(lambda v: v + low)
    whole = back.point(lambda v: v + 0.5).convert("I").point(lambda v: v + int(low))  # rounded (>= 0 before)
    return whole if im.mode == "I" else whole.convert(im.mode)  # via I: Pillow's F to I;16 clips at 255
