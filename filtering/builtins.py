"""The built-in filters: the course's two (grayscale, blur) and the operations people expect of
an image service: resize, crop, rotate, flip, sharpen, edges, sepia, brightness, contrast,
pixelate, and ``format`` (the result's format, on purpose). Each is made like a plugin's (with
:func:`~filtering.model.define`) and listed in :data:`BUILTIN_FILTERS`, which the registry
takes in; they chain in a pipeline (:mod:`filtering.pipeline`).

Pure functions of (image, params): any mode the server accepts is either handled or converted to
one the operation takes (8-bit gray or RGB, keeping an alpha channel).
"""

from __future__ import annotations

import math

from PIL import Image, ImageEnhance, ImageFilter

from filtering.model import Param, define
from imaging.formats import ALPHA_MODES, DEEP_MODES


@define("grayscale", "luminance (ITU-R 601-2), keeping an alpha channel if there is one", colour="gray")
def grayscale(im: Image.Image, params: dict) -> Image.Image:
    if im.mode in DEEP_MODES:
        return im.copy()  # gray already, at its own depth (an 8-bit L would clip it at 255)
    if im.mode == "LAB":
        return im.getchannel("L")  # its lightness (Pillow converts LAB to nothing else)
    if im.mode == "HSV":
        im = im.convert("RGB")
    if im.mode in ALPHA_MODES or "transparency" in im.info:  # a colour marked transparent too
        return im.convert("LA")
    return im.convert("L")


#: Modes GaussianBlur does not take, and the mode each is blurred in (a palette decoded).
_BLURRED_AS = {"1": "L", "P": "RGB", "PA": "RGBA", "HSV": "RGB"}


@define("blur", "Gaussian blur",
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


#: The largest side an operation makes (and a resize asks for): 10,000 px (the pixel limit of
#: the whole result is the worker's, formats.MAX_PIXELS).
MAX_SIDE = 10_000
#: What the ``format`` step writes, by its ``type``: the Pillow format.
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def eight_bit(im: Image.Image) -> Image.Image:
    """``im`` in a mode 8-bit operations take (L, LA, RGB or RGBA): a palette decoded (its
    transparent colour as alpha), a deep gray image spread over 256 levels from its own range."""
    if im.mode in ("L", "LA", "RGB", "RGBA"):
        return im
    if im.mode in DEEP_MODES:
        values = im.convert("F")
        low, high = values.getextrema()
        step = (high - low) / 255 or 1
        return values.point(lambda v: (v - low) / step + 0.5).convert("L")
    alpha = im.mode in ALPHA_MODES or "transparency" in im.info
    if im.mode in ("1", "La"):
        return im.convert("L")
    return im.convert("RGBA" if alpha else "RGB")


def _fits(width: int, height: int) -> tuple[int, int]:
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise ValueError(f"it would make a {width}x{height} image (each side at most {MAX_SIDE} px)")
    return width, height


def _needs_a_side(params: dict) -> None:
    if "width" not in params and "height" not in params:
        raise ValueError("give width or height (or both)")


def _resized(w: int, h: int, params: dict) -> tuple[int, int]:
    scale = min(params.get("width", MAX_SIDE * w) / w, params.get("height", MAX_SIDE * h) / h)
    return max(1, round(w * scale)), max(1, round(h * scale))


@define("resize", "scale to fit inside width x height, keeping the aspect ratio (a side not given is free)",
          Param("width", int, None, 1, MAX_SIDE, "the most pixels across"),
          Param("height", int, None, 1, MAX_SIDE, "the most pixels down"),
          size="changes", check=_needs_a_side, dims=_resized)
def resize(im: Image.Image, params: dict) -> Image.Image:
    size = _fits(*_resized(im.width, im.height, params))
    if im.mode not in _RESIZED_AS_THEY_ARE:
        im = eight_bit(im)  # a palette or 1-bit image would be resized by nearest neighbour
    return im.resize(size, Image.Resampling.LANCZOS if im.mode not in DEEP_MODES else Image.Resampling.BILINEAR)


#: Modes resized with a real filter as they are (deep ones bilinearly).
_RESIZED_AS_THEY_ARE = DEEP_MODES | {"L", "LA", "RGB", "RGBA", "CMYK"}


def _crop_box(params: dict) -> None:
    if ("left" in params) != ("top" in params):
        raise ValueError("give both left and top (a box), or neither (centred)")


@define("crop", "cut out width x height pixels at left, top (without them: from the centre)",
          Param("width", int, 100, 1, MAX_SIDE, "pixels across"),
          Param("height", int, 100, 1, MAX_SIDE, "pixels down"),
          Param("left", int, None, 0, MAX_SIDE, "the box's left edge"),
          Param("top", int, None, 0, MAX_SIDE, "the box's top edge"),
          size="changes", check=_crop_box, dims=lambda w, h, p: _crop_of(w, h, p)[2:])
def crop(im: Image.Image, params: dict) -> Image.Image:
    left, top, cw, ch = _crop_of(im.width, im.height, params)
    return im.crop((left, top, left + cw, top + ch))


def _crop_of(w: int, h: int, params: dict) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the crop of a w x h image."""
    cw, ch = min(params["width"], w), min(params["height"], h)
    if "left" in params:
        left, top = params["left"], params["top"]
        if left >= w or top >= h:
            raise ValueError(f"the box at {left},{top} is outside the {w}x{h} image")
        return left, top, min(cw, w - left), min(ch, h - top)
    return (w - cw) // 2, (h - ch) // 2, cw, ch


_QUARTER_TURNS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


@define("rotate", "turn anticlockwise by degrees (a quarter turn exactly; other angles grow the canvas,"
                    " the corners transparent or black)",
          Param("degrees", float, 90.0, -360.0, 360.0, "the angle, anticlockwise"), size="changes",
          dims=lambda w, h, p: _rotated(w, h, p["degrees"]))
def rotate(im: Image.Image, params: dict) -> Image.Image:
    degrees = params["degrees"] % 360
    if degrees == 0:
        return im.copy()
    if degrees in _QUARTER_TURNS:
        return im.transpose(_QUARTER_TURNS[degrees])
    im = eight_bit(im)
    out = im.rotate(degrees, Image.Resampling.BICUBIC, expand=True)
    _fits(*out.size)
    return out


def _rotated(w: int, h: int, degrees: float) -> tuple[int, int]:
    """The canvas a rotation by ``degrees`` makes (Pillow's expand=True), or near it (+1)."""
    degrees %= 360
    if degrees in (0, 180):
        return w, h
    if degrees in (90, 270):
        return h, w
    c, s = abs(math.cos(math.radians(degrees))), abs(math.sin(math.radians(degrees)))
    return math.ceil(w * c + h * s) + 1, math.ceil(w * s + h * c) + 1


@define("flip", "mirror left to right (horizontal) or top to bottom (vertical)",
          Param("direction", str, "horizontal", help="horizontal or vertical",
                choices=("horizontal", "vertical")))
def flip(im: Image.Image, params: dict) -> Image.Image:
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT if params["direction"] == "horizontal"
                        else Image.Transpose.FLIP_TOP_BOTTOM)


@define("sharpen", "unsharp mask",
          Param("radius", float, 2.0, 0.0, 50.0, "the blur the mask is made with, in pixels"),
          Param("percent", int, 150, 0, 1000, "how strong"),
          Param("threshold", int, 3, 0, 255, "the least difference sharpened"))
def sharpen(im: Image.Image, params: dict) -> Image.Image:
    return eight_bit(im).filter(ImageFilter.UnsharpMask(params["radius"], params["percent"], params["threshold"]))


@define("edges", "edge detection (Pillow's FIND_EDGES): outlines on black")
def edges(im: Image.Image, params: dict) -> Image.Image:
    im = eight_bit(im)
    if im.mode in ("LA", "RGBA"):  # the outlines of the colour bands, the alpha kept as it is
        *bands, alpha = im.split()
        found = Image.merge(im.mode[:-1], bands).filter(ImageFilter.FIND_EDGES)
        return Image.merge(im.mode, [*found.split(), alpha])
    return im.filter(ImageFilter.FIND_EDGES)


#: The classic sepia matrix (rows: the output's red, green, blue from the input's).
SEPIA = ((0.393, 0.769, 0.189), (0.349, 0.686, 0.168), (0.272, 0.534, 0.131))


@define("sepia", "warm brown tones (an array kernel: on a worker's GPU where it has one)",
          Param("strength", float, 1.0, 0.0, 1.0, "0 leaves the image as it is, 1 is full sepia"),
          colour="any", kernel=True, pointwise=True)
def sepia(xp, rgb, params: dict):
    """``rgb`` (height x width x 3, uint8) in sepia; ``xp`` is NumPy or CuPy. The mix of the
    sepia matrix and the identity by strength is one matrix: one product, in place after it."""
    s = float(params.get("strength", 1.0))
    matrix = xp.asarray(SEPIA, dtype=xp.float32) * s + xp.eye(3, dtype=xp.float32) * (1 - s)
    out = rgb.astype(xp.float32) @ matrix.T
    xp.clip(out, 0, 255, out=out)
    return xp.rint(out, out=out)


@define("brightness", "lighter or darker: 1 leaves it, 0 is black, 2 twice as bright",
          Param("factor", float, 1.2, 0.0, 10.0, "the brightness factor"))
def brightness(im: Image.Image, params: dict) -> Image.Image:
    return _enhanced(ImageEnhance.Brightness, im, params["factor"])


@define("contrast", "more or less contrast: 1 leaves it, 0 is flat gray",
          Param("factor", float, 1.2, 0.0, 10.0, "the contrast factor"))
def contrast(im: Image.Image, params: dict) -> Image.Image:
    return _enhanced(ImageEnhance.Contrast, im, params["factor"])


def _enhanced(kind, im: Image.Image, factor: float) -> Image.Image:
    im = eight_bit(im)
    if im.mode in ("LA", "RGBA"):  # ImageEnhance would blend the alpha too
        *bands, alpha = im.split()
        out = kind(Image.merge(im.mode[:-1], bands)).enhance(factor)
        return Image.merge(im.mode, [*out.split(), alpha])
    return kind(im).enhance(factor)


@define("pixelate", "blocks of size x size pixels, each of its average colour",
          Param("size", int, 8, 1, 1000, "the block's side, in pixels"))
def pixelate(im: Image.Image, params: dict) -> Image.Image:
    im = eight_bit(im)
    w, h = im.size
    small = im.resize((max(1, -(-w // params["size"])), max(1, -(-h // params["size"]))), Image.Resampling.BOX)
    return small.resize((w, h), Image.Resampling.NEAREST)


@define("format", "write the result as PNG, JPEG (with a quality) or WebP, whatever the original was",
          Param("type", str, "png", help="png, jpeg or webp", choices=tuple(OUTPUT_FORMATS)),
          Param("quality", int, 90, 1, 100, "for JPEG and WebP"),
          output_format=True)
def format_(im: Image.Image, params: dict) -> Image.Image:
    return im  # the encoder writes it (worker.filters), in a mode the format stores


def storable_as(im: Image.Image, fmt: str) -> Image.Image:
    """``im`` in a mode the output format ``fmt`` (of a format step) stores."""
    if fmt == "JPEG" and im.mode not in ("L", "RGB", "CMYK"):
        im = eight_bit(im)
        return im.convert("L" if im.mode in ("L", "LA") else "RGB")
    if fmt == "WEBP" and im.mode not in ("RGB", "RGBA"):
        im = eight_bit(im)
        return im.convert("RGBA" if im.mode in ("LA", "RGBA") else "RGB")
    if fmt == "PNG" and im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"):
        return eight_bit(im)
    return im


#: The built-in filters, in the order they are listed (the course's two first).
BUILTIN_FILTERS = (grayscale, blur, resize, crop, rotate, flip, sharpen, edges, sepia, brightness, contrast,
                   pixelate, format_)
