"""Video in and out with PyAV (its wheels carry FFmpeg): probe, decode to frames, encode frames.

Everything here is blocking; the CLI runs it in one dedicated thread (a container must not be
used from two threads at once) while uploads and downloads go on in the event loop.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image, ImageDraw

from cli.session import CliError

#: Output codec by file extension; the first one this FFmpeg build has is used.
CODECS: dict[str, tuple[str, ...]] = {
    ".mp4": ("libx264", "mpeg4"), ".mov": ("libx264", "mpeg4"), ".mkv": ("libx264", "mpeg4", "ffv1"),
    ".m4v": ("libx264", "mpeg4"), ".avi": ("mpeg4",), ".webm": ("libvpx-vp9",),
}
#: Near-transparent quality by default: the point is to see the filter, not the codec.
QUALITY = {"libx264": {"crf": "16", "preset": "veryfast"}, "libvpx-vp9": {"crf": "20", "b": "0"},
           "mpeg4": {"qscale": "2"}}


@dataclass(frozen=True)
class VideoInfo:
    fps: Fraction
    width: int
    height: int
    frames: int  # as the container says; 0 when it does not know
    codec: str

    def meta(self, source: str) -> dict:
        """What ``video push`` stores with the workload so that ``video pull`` can rebuild it."""
        return {"video": {"source": source, "fps": str(self.fps), "width": self.width,
                          "height": self.height, "codec": self.codec}}


def fps_of(meta: dict) -> Fraction | None:
    try:
        return Fraction(meta["video"]["fps"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _open(path: Path) -> av.container.InputContainer:
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise CliError(f"{path}: cannot open as a video: {e}") from e
    if not container.streams.video:
        container.close()
        raise CliError(f"{path}: has no video stream")
    return container


def probe(path: Path) -> VideoInfo:
    """The first video stream's rate, size, codec and frame count. A container that does not
    say how many frames it holds (Matroska, WebM, AVI) has its packets counted: a pass over the
    file without decoding, so that a push knows how many images it is going to send."""
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate or Fraction(25)
        ctx = stream.codec_context
        frames = stream.frames or 0
        if not frames:
            try:
                frames = sum(1 for packet in container.demux(stream) if packet.size)
            except av.FFmpegError:
                frames = 0  # decoding will tell what there is; the push then announces nothing
        return VideoInfo(Fraction(fps), ctx.width, ctx.height, frames, ctx.name)


def frames(path: Path) -> Iterator[Image.Image]:
    """Decode ``path``'s first video stream frame by frame, as RGB images."""
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                yield frame.to_image()
        except av.FFmpegError as e:
            raise CliError(f"{path}: cannot decode: {e}") from e


def png(image: Image.Image) -> bytes:
    """A frame as PNG, at a fast zlib level (encoding dominates a push otherwise)."""
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


class Writer:
    """Encode frames into ``path`` at ``fps``; the size is the first frame's (even-rounded for
    4:2:0 codecs, which need even sides)."""

    def __init__(self, path: Path, fps: Fraction, codec: str | None = None) -> None:
        self.path, self.fps = path, fps
        self.partial = path.with_name(f".{path.stem}.partial{path.suffix}")  # renamed when complete
        self.codec = self.check(path, codec)
        self._out: av.container.OutputContainer | None = None
        self._stream: av.VideoStream | None = None
        self.count = 0

    @classmethod
    def check(cls, path: Path, codec: str | None) -> str:
        """The codec to use for ``path``, or a :class:`CliError` saying why there is none."""
        if codec is None:
            return cls._pick(path)
        try:
            encoder = av.Codec(codec, "w")
        except (av.FFmpegError, ValueError) as e:
            raise CliError(f"no {codec!r} encoder in this FFmpeg build ({e})") from e
        if encoder.type != "video":
            raise CliError(f"{codec!r} is not a video encoder")
        return codec

    @staticmethod
    def _pick(path: Path) -> str:
        candidates = CODECS.get(path.suffix.lower())
        if candidates is None:
            raise CliError(f"{path}: unknown video extension; use one of {', '.join(sorted(CODECS))}")
        for name in candidates:
            if name in av.codecs_available:
                return name
        raise CliError(f"this FFmpeg build has none of {', '.join(candidates)}")

    def _start(self, size: tuple[int, int]) -> None:
        try:
            self._out = av.open(str(self.partial), "w")
        except (av.FFmpegError, OSError) as e:
            raise CliError(f"{self.path}: cannot write: {e}") from e
        stream = self._out.add_stream(self.codec, rate=self.fps)
        lossless = self.codec == "ffv1"
        stream.pix_fmt = "yuv444p" if lossless else "yuv420p"
        stream.width, stream.height = (size if lossless else (size[0] & ~1, size[1] & ~1))
        stream.options = QUALITY.get(self.codec, {})
        stream.codec_context.time_base = 1 / self.fps
        self._stream = stream

    def write(self, data: bytes) -> None:
        """Append one frame given as encoded image bytes (what the API serves)."""
        with Image.open(io.BytesIO(data)) as im:
            image = im.convert("RGB")
        if self._out is None:
            self._start(image.size)
        assert self._stream is not None and self._out is not None
        frame = av.VideoFrame.from_image(image)
        frame.pts = self.count
        frame.time_base = self._stream.codec_context.time_base
        self._out.mux(self._stream.encode(frame))
        self.count += 1

    def close(self) -> None:
        """Flush the encoder and put the file in place."""
        if self._out is None:
            return
        assert self._stream is not None
        self._out.mux(self._stream.encode(None))
        self._out.close()
        self._out = None
        self.partial.replace(self.path)

    def abort(self) -> None:
        """Drop what was written: a half video must not pass for a result."""
        if self._out is not None:
            self._out.close()
            self._out = None
        self.partial.unlink(missing_ok=True)


def sample(path: Path, seconds: float = 3.0, fps: int = 12, size: tuple[int, int] = (320, 240)) -> int:
    """Write a synthetic clip (moving shapes on a colour gradient); returns its frame count.
    For trying DPIP out and for the tests: nothing is downloaded."""
    w, h = size
    base = Image.merge("RGB", [
        Image.linear_gradient("L").resize(size),
        Image.linear_gradient("L").rotate(90).resize(size),
        Image.new("L", size, 96),
    ])
    count = round(seconds * fps)
    writer = Writer(path, Fraction(fps))
    try:
        for i in range(count):
            t = i / count
            im = base.copy()
            draw = ImageDraw.Draw(im)
            # Shapes that jump between frames, so that a frame out of order shows.
            x = (i * 37) % (w - 80)
            y = int((h - 80) * (0.5 + 0.45 * math.sin(2 * math.pi * 3 * t)))
            draw.ellipse((x, y, x + 80, y + 80), fill=(230, 40, 40))
            draw.rectangle((w - 70 - x // 2, 10, w - 10 - x // 2, 70), fill=(40, 200, 60))
            draw.text((10, h - 20), f"frame {i}", fill=(255, 255, 255))
            writer.write(png(im))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return count
