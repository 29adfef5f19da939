"""Applying a filter to image bytes: decode, filter, encode; no sockets, no clocks.

:func:`process` decodes an image, applies a filter of the registry (:mod:`common.filters`) and
encodes it back in the input's format and size: every frame of an animation (GIF, WebP, APNG)
with its timing, every page of a multi-page TIFF. PNG is written at a fast zlib level (1 by
default): on 720p frames that is about 4x faster than Pillow's default 6 for ~15% more bytes,
and encoding dominates a job.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace

from PIL import Image

from common import filters, formats, iccprofile, operations, pipeline

ORIENTATION = 0x0112  # the EXIF tag
#: How to turn an image upright, by its EXIF orientation (1, or none: as it is).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}

#: Largest image a worker decodes (:data:`common.formats.MAX_PIXELS`). An animation's frames
#: (a TIFF's pages) count together: each is decoded at the canvas's size.
MAX_PIXELS = formats.MAX_PIXELS
#: Most frames (pages) filtered: a frame costs ~0.1 ms and an object in memory however small it
#: is, and a few bytes of GIF make one (40 s at 25 frames a second; long GIFs have hundreds).
MAX_FRAMES = 1000

#: Modes each format stores a result in as it is; others are converted (see :func:`_storable`).
#: (Pillow writes a WebP's L as RGB and a GIF's RGB(A) as a palette by itself.)
_BMP_MODES = frozenset({"1", "L", "P", "RGB", "RGBA"})
#: TIFF compressions a result is written with as its original was, in any mode; lossy JPEG
#: and the fax codecs only where the result's mode allows them, others as deflate.
_TIFF_ANY_MODE = frozenset({"raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits", "lzma", "zstd"})
_TIFF_JPEG_MODES = frozenset({"L", "RGB", "CMYK", "YCbCr"})
_TIFF_FOR_MODES = {"jpeg": _TIFF_JPEG_MODES, "tiff_jpeg": _TIFF_JPEG_MODES,
                   "group3": frozenset({"1"}), "group4": frozenset({"1"}), "tiff_ccitt": frozenset({"1"})}
_ANIMATED = frozenset({"GIF", "WEBP", "PNG"})  # formats whose frames have a duration
#: An animation's own settings its result keeps (with each frame's duration); a TIFF's compression.
_KEPT = ("loop", "default_image", "compression")


class FilterError(ValueError):
    """The image cannot be processed (unknown filter or parameters, undecodable bytes)."""


@dataclass(frozen=True)
class EncodeOptions:
    png_compress_level: int = 1
    jpeg_quality: int = 90
    webp_quality: int | None = None  # None: Pillow's own (a format step sets it)


def steps_of(filter_: str, params: dict | None = None) -> list[tuple[filters.FilterSpec, dict]]:
    """The filters of a job's pipeline (one filter, or a pipeline's text), each with its checked
    parameters; FilterError naming the step this worker cannot run."""
    try:
        raw = pipeline.of_stored(filter_, params or {})
    except pipeline.PipelineError as e:
        raise FilterError(str(e)) from None
    out = []
    for i, (name, values) in enumerate(raw, 1):
        try:
            spec = filters.spec(name)
            out.append((spec, spec.validate(values)))
        except ValueError as e:
            raise FilterError(f"{_step(i, name, len(raw))}: {e}" if len(raw) > 1 else str(e)) from None
    return out


_step = pipeline.step_name


def process(data: bytes, name: str, params: dict | None = None,
            options: EncodeOptions = EncodeOptions(), limits: pipeline.Limits = pipeline.Limits(),
            stop: threading.Event | None = None) -> tuple[bytes, str]:
    """Filter image ``data`` with filter (or pipeline) ``name``; return (encoded bytes, Pillow
    format): the original's format, unless a ``format`` step chose another. Every step's image
    stays within ``limits.max_pixels`` (a step that would pass it is refused before it runs) and
    the whole job within its pixel-step budget; ``stop`` set (the job was cancelled) ends the
    work at the next step, frame or kernel tile (:class:`~common.filters.Stopped`)."""
    filters.set_stop(stop)
    try:
        return _process(data, name, params, options, limits)
    finally:
        filters.set_stop(None)


def _process(data: bytes, name: str, params: dict | None, options: EncodeOptions,
             limits: pipeline.Limits) -> tuple[bytes, str]:
    steps = steps_of(name, params)
    meter = pipeline.Meter(limits)
    out_fmt, quality = None, options.jpeg_quality
    for spec, values in steps:
        if spec.output_format:
            out_fmt, quality = operations.OUTPUT_FORMATS[values["type"]], values["quality"]
    outs: list[Image.Image] = []
    durations: list[int] = []
    try:
        with Image.open(io.BytesIO(data)) as im:
            # an MPO is a JPEG with more pictures after its end, which the server does not keep
            fmt = "JPEG" if im.format == "MPO" else im.format or "PNG"
            if im.size[0] * im.size[1] > limits.max_pixels:
                raise FilterError(f"image of {im.size[0]}x{im.size[1]} pixels exceeds the limit of {limits.max_pixels}")
            kept = {key: im.info[key] for key in _KEPT if key in im.info}
            icc = im.info.get("icc_profile")  # (what a step makes may not carry it: Pillow's blend)
            every = fmt != "JPEG" and (out_fmt in (None, fmt) or fmt in _ANIMATED and out_fmt != "JPEG")
            frames = min(getattr(im, "n_frames", 1), MAX_FRAMES) if every else 1  # (skips frames, decodes none)
            problem = pipeline.cost_problem(steps, *_upright_size(im), limits, frames)
            if problem:  # known before any work: refused at once (the meter counts what runs)
                raise FilterError(problem)
            turn: Image.Transpose | None = None
            made = 0
            for frame in _frames(im, every, limits.max_pixels):
                filters.checkpoint()
                # A phone's portrait photo is stored sideways with an EXIF Orientation: filter it
                # upright. The result is saved without EXIF (no GPS position leaves with it).
                if not outs:
                    turn = _turn(frame)  # the first frame's EXIF speaks for all
                out = frame.transpose(turn) if turn is not None else frame
                for i, (spec, values) in enumerate(steps, 1):
                    where = _step(i, spec.name, len(steps))
                    predicted = meter.before(where, spec, values, out.width, out.height)
                    filters.checkpoint()
                    try:
                        assert spec.apply is not None
                        out = spec.apply(out, values)
                    except ValueError as e:  # the filter's own refusal (what the mode cannot take)
                        raise FilterError(f"cannot {where} this {frame.mode} image: {e}") from None
                    except (MemoryError, Image.DecompressionBombError, filters.Stopped):
                        raise
                    except Exception as e:  # a plugin's bug: this job fails for good, saying so
                        raise FilterError(f"{where} failed: {type(e).__name__}: {str(e)[:200]}") from None
                    if not isinstance(out, Image.Image):
                        raise FilterError(f"{spec.name} returned {type(out).__name__}, not an image")
                    meter.after(where, predicted, out.width, out.height)
                made += out.width * out.height
                if made > limits.max_pixels:
                    raise FilterError(f"the result would exceed the limit of {limits.max_pixels} pixels")
                outs.append(out)
                durations.append(frame.info.get("duration") or 0)
    except (FilterError, filters.Stopped):
        raise
    except pipeline.TooCostly as e:
        raise FilterError(str(e)) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FilterError(f"cannot decode the image: {e}") from None
    if out_fmt is not None and out_fmt != fmt:
        outs = [operations.storable_as(out, out_fmt) for out in outs]
        kept = {k: v for k, v in kept.items() if k == "loop"}
        fmt = out_fmt
    filters.checkpoint()
    for out in outs:  # what the encoders would copy from the image: no free text
        _without_text(out, icc)
    try:
        chosen = replace(options, jpeg_quality=quality, webp_quality=quality) if out_fmt else options
        return _encode(outs, fmt, chosen, kept, durations), fmt
    except (OSError, ValueError) as e:
        raise FilterError(f"cannot encode the result as {fmt}: {e}") from None


def _frames(im: Image.Image, every: bool, max_pixels: int = MAX_PIXELS) -> Iterator[Image.Image]:
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
            raise FilterError(f"more than {MAX_FRAMES} frames (or TIFF pages): the limit is {MAX_FRAMES}")
        if total > max_pixels:
            raise FilterError(f"{index + 1} frames (or TIFF pages) of {im.width}x{im.height} exceed the limit of"
                              f" {max_pixels} pixels in all")
        im.load()
        yield im


def _upright_size(im: Image.Image) -> tuple[int, int]:
    turn = _turn(im)
    swapped = turn in (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
                       Image.Transpose.ROTATE_270)
    return (im.height, im.width) if swapped else (im.width, im.height)


def _turn(im: Image.Image) -> Image.Transpose | None:
    """How to turn the image to be seen upright (from its EXIF), or None: it is."""
    return _UPRIGHT.get(im.getexif().get(ORIENTATION, 1))


def _encode(outs: list[Image.Image], fmt: str, options: EncodeOptions, kept: dict, durations: list[int]) -> bytes:
    buf = io.BytesIO()
    first, *rest = (_storable(out, fmt) for out in outs)
    more: dict = {}
    if rest:
        more = {"save_all": True, "append_images": rest}
        if fmt in _ANIMATED:  # (an APNG's still default image is no frame of its animation)
            more.update(duration=durations[1:] if kept.get("default_image") else durations,
                        **{k: kept[k] for k in ("loop", "default_image") if k in kept})
    if fmt == "PNG":
        first.save(buf, "PNG", compress_level=options.png_compress_level, **more)
    elif fmt == "JPEG":  # (JPEG and WebP write a profile only when given one: the colours it says are kept)
        first.save(buf, "JPEG", quality=options.jpeg_quality, icc_profile=first.info.get("icc_profile"))
    elif fmt == "TIFF":
        compression = _tiff_compression(kept.get("compression"), {out.mode for out in [first, *rest]})
        if compression in ("jpeg", "tiff_jpeg"):
            more["quality"] = options.jpeg_quality
        first.save(buf, "TIFF", compression=compression, **more)
    elif fmt == "WEBP":
        quality = {"quality": options.webp_quality} if options.webp_quality is not None else {}
        first.save(buf, "WEBP", icc_profile=first.info.get("icc_profile") or "", **quality, **more)
    else:
        first.save(buf, fmt, **more)
    return buf.getvalue()


def _without_text(im: Image.Image, icc: bytes | None) -> None:
    """The result's info as encoders will write it: no comment, and the original's ICC profile
    (``icc``) without its text (:func:`common.iccprofile.scrubbed`), where it fits the result's
    colours (an RGB profile is left off a grayscale result)."""
    im.info.pop("comment", None)
    clean = iccprofile.scrubbed(icc, im.mode) if icc else None
    if clean:
        im.info["icc_profile"] = clean
    else:
        im.info.pop("icc_profile", None)


def _storable(out: Image.Image, fmt: str) -> Image.Image:
    """``out`` in a mode ``fmt`` stores: JPEG and BMP drop an alpha channel they cannot keep; a
    GIF keeps one as its transparent colour (Pillow would drop the alpha of an LA image)."""
    if fmt == "JPEG" and out.mode in ("LA", "RGBA"):
        return out.convert(out.mode[:-1])
    if fmt == "BMP" and out.mode not in _BMP_MODES:
        return out.convert("L" if out.mode == "LA" else "RGB")
    if fmt == "GIF" and out.mode in ("LA", "PA"):
        return out.convert("RGBA")
    return out


def _tiff_compression(original: str | None, modes: set[str]) -> str:
    """The original's compression if every page of the result can be written with it, else
    deflate (a fax of black and white pages blurred into gray ones, say)."""
    original = original or "raw"
    if original in _TIFF_ANY_MODE or modes <= _TIFF_FOR_MODES.get(original, frozenset()):
        return original
    return "tiff_adobe_deflate"
