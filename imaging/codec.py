"""Decoding and encoding what a job filters: an image's frames (an animation's, a TIFF's pages)
within the pixel and frame limits, the way it is seen upright (EXIF orientation), and the result
written back in a format's own terms (the modes it stores, a TIFF's compression, an animation's
timing), with no text but its colour profile's colours. PNG is written at a fast zlib level (1
by default): on 720p frames about 4x faster than Pillow's default 6 for ~15% more bytes, and
encoding dominates a job.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from imaging import formats, icc
from imaging.exif import ORIENTATION

#: How to turn an image upright, by its EXIF orientation (1, or none: as it is).
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}

#: Largest image a worker decodes (:data:`imaging.formats.MAX_PIXELS`). An animation's frames
#: (a TIFF's pages) count together: each is decoded at the canvas's size.
MAX_PIXELS = formats.MAX_PIXELS
#: Most frames (pages) filtered: a frame costs ~0.1 ms and an object in memory however small it
#: is, and a few bytes of GIF make one (40 s at 25 frames a second; long GIFs have hundreds).
MAX_FRAMES = 1000

#: Modes each format stores a result in as it is; others are converted (see :func:`storable`).
#: (Pillow writes a WebP's L as RGB and a GIF's RGB(A) as a palette by itself.)
BMP_MODES = frozenset({"1", "L", "P", "RGB", "RGBA"})
#: TIFF compressions a result is written with as its original was, in any mode; lossy JPEG
#: and the fax codecs only where the result's mode allows them, others as deflate.
TIFF_ANY_MODE = frozenset({"raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits", "lzma", "zstd"})
TIFF_JPEG_MODES = frozenset({"L", "RGB", "CMYK", "YCbCr"})
TIFF_FOR_MODES = {"jpeg": TIFF_JPEG_MODES, "tiff_jpeg": TIFF_JPEG_MODES,
                   "group3": frozenset({"1"}), "group4": frozenset({"1"}), "tiff_ccitt": frozenset({"1"})}
ANIMATED = frozenset({"GIF", "WEBP", "PNG"})  # formats whose frames have a duration
#: An animation's own settings its result keeps (with each frame's duration); a TIFF's compression.
KEPT = ("loop", "default_image", "compression")


class LimitExceeded(ValueError):
    """More frames, or more pixels in all, than a job may decode."""


@dataclass(frozen=True)
class EncodeOptions:
    png_compress_level: int = 1
    jpeg_quality: int = 90
    webp_quality: int | None = None  # None: Pillow's own (a format step sets it)


def frames(im: Image.Image, every: bool, max_pixels: int = MAX_PIXELS) -> Iterator[Image.Image]:
    """``im`` decoded; then, if ``every``, each further frame of an animation (page of a TIFF),
    while they stay within :data:`MAX_FRAMES` and, all together, ``max_pixels``."""
    more = every and getattr(im, "is_animated", False)  # before loading: a GIF finds out by skipping frame 0
    im.load()
    yield im
    if not more:
        return
    total = im.width * im.height
    for index in range(1, MAX_FRAMES + 1):
        try:
            im.seek(index)
        except EOFError:
            return
        total += im.width * im.height
        if index == MAX_FRAMES:
            raise LimitExceeded(f"more than {MAX_FRAMES} frames (or TIFF pages): the limit is {MAX_FRAMES}")
        if total > max_pixels:
            raise LimitExceeded(f"{index + 1} frames (or TIFF pages) of {im.width}x{im.height} exceed the limit of"
                              f" {max_pixels} pixels in all")
        im.load()
        yield im


def upright_size(im: Image.Image) -> tuple[int, int]:
    """The size of ``im`` as it is seen, once its EXIF orientation is applied."""
    how = turn(im)
    swapped = how in (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
                       Image.Transpose.ROTATE_270)
    return (im.height, im.width) if swapped else (im.width, im.height)


def turn(im: Image.Image) -> Image.Transpose | None:
    """How to turn the image to be seen upright (from its EXIF), or None: it is."""
    return UPRIGHT.get(im.getexif().get(ORIENTATION, 1))


def encode(outs: list[Image.Image], fmt: str, options: EncodeOptions, kept: dict, durations: list[int]) -> bytes:
    buf = io.BytesIO()
    first, *rest = (storable(out, fmt) for out in outs)
    more: dict = {}
    if rest:
        more = {"save_all": True, "append_images": rest}
        if fmt in ANIMATED:  # (an APNG's still default image is no frame of its animation)
            more.update(duration=durations[1:] if kept.get("default_image") else durations,
                        **{k: kept[k] for k in ("loop", "default_image") if k in kept})
    if fmt == "PNG":
        first.save(buf, "PNG", compress_level=options.png_compress_level, **more)
    elif fmt == "JPEG":  # (JPEG and WebP write a profile only when given one: the colours it says are kept)
        first.save(buf, "JPEG", quality=options.jpeg_quality, icc_profile=first.info.get("icc_profile"))
    elif fmt == "TIFF":
        compression = tiff_compression(kept.get("compression"), {out.mode for out in [first, *rest]})
        if compression in ("jpeg", "tiff_jpeg"):
            more["quality"] = options.jpeg_quality
        first.save(buf, "TIFF", compression=compression, **more)
    elif fmt == "WEBP":
        quality = {"quality": options.webp_quality} if options.webp_quality is not None else {}
        first.save(buf, "WEBP", icc_profile=first.info.get("icc_profile") or "", **quality, **more)
    else:
        first.save(buf, fmt, **more)
    return buf.getvalue()


def without_text(im: Image.Image, profile: bytes | None) -> None:
    """The result's info as encoders will write it: no comment, and the original's ICC
    ``profile`` without its text (:func:`imaging.icc.scrubbed`), where it fits the result's
    colours (an RGB profile is left off a grayscale result)."""
    im.info.pop("comment", None)
    clean = icc.scrubbed(profile, im.mode) if profile else None
    if clean:
        im.info["icc_profile"] = clean
    else:
        im.info.pop("icc_profile", None)


def storable(out: Image.Image, fmt: str) -> Image.Image:
    """``out`` in a mode ``fmt`` stores: JPEG and BMP drop an alpha channel they cannot keep; a
    GIF keeps one as its transparent colour (Pillow would drop the alpha of an LA image)."""
    if fmt == "JPEG" and out.mode in ("LA", "RGBA"):
        return out.convert(out.mode[:-1])
    if fmt == "BMP" and out.mode not in BMP_MODES:
        return out.convert("L" if out.mode == "LA" else "RGB")
    if fmt == "GIF" and out.mode in ("LA", "PA"):
        return out.convert("RGBA")
    return out


def tiff_compression(original: str | None, modes: set[str]) -> str:
    """The original's compression if every page of the result can be written with it, else
    deflate (a fax of black and white pages blurred into gray ones, say)."""
    original = original or "raw"
    if original in TIFF_ANY_MODE or modes <= TIFF_FOR_MODES.get(original, frozenset()):
        return original
    return "tiff_adobe_deflate"
