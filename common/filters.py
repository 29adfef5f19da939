"""The filters DPIP offers, in one registry, and the model every filter is written in.

The API validates a workload's pipeline and parameters against it, the worker applies it,
``dpip`` and the dashboard list it (through ``GET /filters``), the OpenAPI description shows it.
A filter is a pure function ``(Image, params) -> Image`` (no sockets, no clocks) with a name, a
help line, typed and bounded parameters and a declaration of what its output looks like:

    @define("posterize", "fewer colour levels", Param("bits", int, 4, 1, 8, "bits per band"))
    def posterize(im, params): ...

Built-in filters are registered here and in :mod:`common.operations`; others come from installed
packages through the ``dpip.filters`` entry-point group (:func:`load_plugins`). A filter may
instead be an *array kernel* ``(xp, rgb, params) -> rgb`` (``kernel=True``): ``xp`` is NumPy, or
CuPy on a worker with an NVIDIA GPU, so the same code runs on both.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from PIL import Image, ImageFilter

logger = logging.getLogger(__name__)

Apply = Callable[[Image.Image, dict], Image.Image]
#: ``(width, height, params) -> (width, height)``: the size of a filter's output for an input of
#: that size, known before it runs (so a step that would make too large an image is refused
#: before anything is allocated).
Dims = Callable[[int, int, dict], tuple[int, int]]
#: ``(xp, array of height x width x 3 uint8, params) -> array of the same shape``
Kernel = Callable[..., object]

#: The entry-point group plugins register their filters under.
ENTRY_POINT_GROUP = "dpip.filters"
#: What a filter's (and a parameter's) name may be.
FILTER_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: The two filters of the course; a bodiless POST /workloads means the first.
COURSE = ("grayscale", "blur")
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
    def grayscale_output(self) -> bool:
        """The result is grayscale whatever the input (checked on upload)."""
        return self.colour == "gray"

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


REGISTRY: dict[str, FilterSpec] = {}
DEFAULT = "grayscale"


def register(name: str, help: str, *params: Param, **declared) -> Callable[[Callable], Callable]:
    """Define the decorated function as a built-in filter and add it to the registry."""
    def add(fn: Callable) -> Callable:
        REGISTRY[name] = replace(define(name, help, *params, **declared)(fn), builtin=True)
        return fn
    return add


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
                problems.append(f"{where} is not a filter made with common.filters.define, skipped")
            elif s.name in REGISTRY:
                problems.append(f"{where}: a filter named {s.name!r} is already "
                                f"{'built in' if REGISTRY[s.name].builtin else 'offered by another plugin'}, skipped")
            else:
                REGISTRY[s.name] = replace(s, version=version or s.version, builtin=False)
    for line in problems:
        logger.warning("%s", line)
    return problems


# -- array kernels ------------------------------------------------------------------------------

def array_module(gpu: bool):
    """CuPy where there is a GPU to run it on and it is installed, else NumPy."""
    if gpu:
        try:
            import cupy  # type: ignore[import-not-found]  # only on machines with a GPU
            return cupy
        except ImportError:
            pass
    import numpy
    return numpy


#: Set by a worker that has a GPU (and CuPy): kernels then run there.
USE_GPU = False


#: Pixels a pointwise kernel is given at once: its float arrays stay near 12 MB each however
#: large the image (a 50-megapixel image as float32 RGB is 600 MB an array).
TILE_PIXELS = 1 << 20


def run_kernel(kernel: Kernel, im: Image.Image, params: dict, xp=None, pointwise: bool = False) -> Image.Image:
    """Apply an array kernel to ``im``'s colour bands (as 8-bit RGB), keeping its alpha; a
    pointwise one a band of at most :data:`TILE_PIXELS` at a time, :func:`checkpoint` between."""
    xp = xp or array_module(USE_GPU)
    alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    mode = "RGBA" if alpha else "RGB"
    if not pointwise or im.width * im.height <= TILE_PIXELS:
        return _kernel_on(kernel, im.convert(mode), params, xp)
    out = Image.new(mode, im.size)
    rows = max(1, TILE_PIXELS // max(1, im.width))
    for top in range(0, im.height, rows):
        checkpoint()
        box = (0, top, im.width, min(im.height, top + rows))
        out.paste(_kernel_on(kernel, im.crop(box).convert(mode), params, xp), box[:2])
    return out


def _kernel_on(kernel: Kernel, rgba: Image.Image, params: dict, xp) -> Image.Image:
    import numpy
    a = numpy.asarray(rgba)
    out = kernel(xp, xp.asarray(a[..., :3]), params)
    out = out.get() if hasattr(out, "get") else numpy.asarray(out)  # from the GPU
    if out.shape != a[..., :3].shape:
        raise ValueError(f"the kernel returned an array of shape {out.shape} for {a[..., :3].shape}")
    rgb = numpy.clip(out, 0, 255).astype(numpy.uint8)
    if rgba.mode == "RGBA":
        rgb = numpy.dstack([rgb, a[..., 3]])
    return Image.fromarray(rgb, rgba.mode)


class Stopped(Exception):
    """The job this work is for was cancelled (or timed out): raised at a :func:`checkpoint`."""


_work = threading.local()


def checkpoint() -> None:
    """Raise :class:`Stopped` if the job running in this thread was cancelled. The worker
    calls it between steps, frames and a kernel's tiles; a plugin's long loop may call it too."""
    stop = getattr(_work, "stop", None)
    if stop is not None and stop.is_set():
        raise Stopped("the job was cancelled")


def set_stop(stop: threading.Event | None) -> None:
    """The event that stops the work of the current thread (None: nothing stops it)."""
    _work.stop = stop


#: Modes of more than 8 bits a band (16- and 32-bit integers, 32-bit floats): all grayscale.
DEEP_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})


@register("grayscale", "luminance (ITU-R 601-2), keeping an alpha channel if there is one", colour="gray")
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


from common import operations  # noqa: E402,F401  (registers the other built-ins, after the course's two)
