"""A job's work on image bytes: decode, run its pipeline on every frame, encode; no sockets, no
clocks. :func:`process` applies filters of the registry (:mod:`filtering.registry`) within the
job's :class:`~common.models.Limits`, stoppable between steps, frames and a kernel's bands; the
decoding and encoding are :mod:`imaging.codec`'s.
"""

from __future__ import annotations

import io
import threading
from dataclasses import replace

from PIL import Image

from filtering import builtins as operations
from filtering import model, pipeline, registry, work
from imaging import codec
from imaging.codec import EncodeOptions

__all__ = ["EncodeOptions", "FilterError", "process", "steps_of"]


class FilterError(ValueError):
    """The image cannot be processed (unknown filter or parameters, undecodable bytes)."""



def steps_of(filter_: str, params: dict | None = None) -> list[tuple[model.FilterSpec, dict]]:
    """The filters of a job's pipeline (one filter, or a pipeline's text), each with its checked
    parameters; FilterError naming the step this worker cannot run."""
    try:
        raw = pipeline.of_stored(filter_, params or {})
    except pipeline.PipelineError as e:
        raise FilterError(str(e)) from None
    out = []
    for i, (name, values) in enumerate(raw, 1):
        try:
            spec = registry.spec(name)
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
    work at the next step, frame or kernel tile (:class:`~filtering.registry.Stopped`)."""
    work.set_stop(stop)
    try:
        return _process(data, name, params, options, limits)
    finally:
        work.set_stop(None)


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
            kept = {key: im.info[key] for key in codec.KEPT if key in im.info}
            profile = im.info.get("icc_profile")  # (what a step makes may not carry it: Pillow's blend)
            every = fmt != "JPEG" and (out_fmt in (None, fmt) or fmt in codec.ANIMATED and out_fmt != "JPEG")
            frames = min(getattr(im, "n_frames", 1), codec.MAX_FRAMES) if every else 1  # (skips frames, decodes none)
            problem = pipeline.cost_problem(steps, *codec.upright_size(im), limits, frames)
            if problem:  # known before any work: refused at once (the meter counts what runs)
                raise FilterError(problem)
            turn: Image.Transpose | None = None
            made = 0
            for frame in codec.frames(im, every, limits.max_pixels):
                work.checkpoint()
                # A phone's portrait photo is stored sideways with an EXIF Orientation: filter it
                # upright. The result is saved without EXIF (no GPS position leaves with it).
                if not outs:
                    turn = codec.turn(frame)  # the first frame's EXIF speaks for all
                out = frame.transpose(turn) if turn is not None else frame
                for i, (spec, values) in enumerate(steps, 1):
                    where = _step(i, spec.name, len(steps))
                    predicted = meter.before(where, spec, values, out.width, out.height)
                    work.checkpoint()
                    try:
                        assert spec.apply is not None
                        out = spec.apply(out, values)
                    except ValueError as e:  # the filter's own refusal (what the mode cannot take)
                        raise FilterError(f"cannot {where} this {frame.mode} image: {e}") from None
                    except (MemoryError, Image.DecompressionBombError, work.Stopped):
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
    except (FilterError, work.Stopped):
        raise
    except codec.LimitExceeded as e:
        raise FilterError(str(e)) from None
    except pipeline.TooCostly as e:
        raise FilterError(str(e)) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FilterError(f"cannot decode the image: {e}") from None
    if out_fmt is not None and out_fmt != fmt:
        outs = [operations.storable_as(out, out_fmt) for out in outs]
        kept = {k: v for k, v in kept.items() if k == "loop"}
        fmt = out_fmt
    work.checkpoint()
    for out in outs:  # what the encoders would copy from the image: no free text
        codec.without_text(out, profile)
    try:
        chosen = replace(options, jpeg_quality=quality, webp_quality=quality) if out_fmt else options
        return codec.encode(outs, fmt, chosen, kept, durations), fmt
    except (OSError, ValueError) as e:
        raise FilterError(f"cannot encode the result as {fmt}: {e}") from None


def warm_up_image() -> bytes:
    """A small PNG to run through :func:`warm_up`."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 140, 200)).save(out, "PNG")
    return out.getvalue()


def warm_up(sample: bytes, options: EncodeOptions) -> None:
    """One small job of each common codec in this thread: Pillow's plugins imported, the
    thread made (run at a worker's start, before it joins)."""
    process(sample, "grayscale", None, options)
    process(sample, "format", {"type": "jpeg"}, options)
    threading.Event().wait(0.01)  # (held a moment: the executor's other threads are made too)
