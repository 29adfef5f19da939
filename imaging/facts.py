"""What an image's bytes say, read without decoding its pixels: its format's header (size as
seen, upright; mode; a photo's facts from EXIF), how many passes a JPEG takes to decode, and
Pillow's reasons for refusing one, in words a client may read. Pure functions, for uploads and
results alike.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from common.models import BadInput, clipped
from imaging import exif as exifdata
from imaging import metadata
from imaging.formats import png_header, sniff_format

#: What Pillow raises beyond ``Image.MAX_IMAGE_PIXELS`` (the warning, when warnings are errors).
DECOMPRESSION_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)

#: A progressive JPEG is decoded once per scan: 1000 scans of a 94 KB file took minutes. Encoders
#: write about 10 (libjpeg's progressive default, mozjpeg 9-12); refused beyond this many, or
#: beyond this many full decodes' worth of the largest accepted image (scans x pixels).
MAX_JPEG_SCANS = 100

MAX_JPEG_SCAN_IMAGES = 20


@dataclass(frozen=True)
class Header:
    """What an image's header says: its size as seen (upright), its mode, its EXIF facts."""

    width: int
    height: int
    mode: str
    photo: dict | None = None
    frames: int = 1  # an animation's frames, a TIFF's pages (each filtered: a job's cost counts them)

def fast_header(data: bytes, fmt: str) -> Header | None:
    """An 8-bit PNG's header without Pillow, unless it carries EXIF (then Pillow reads it)."""
    if fmt != "PNG" or data.find(b"eXIf", 0, 65536) >= 0 or data.find(b"acTL", 0, 65536) >= 0:  # (an APNG's
        # frames: Pillow) (searched in place: a slice copied 64 KiB of every large image twice)
        return None
    head = png_header(data)
    return Header(*head) if head is not None else None

def header_of(source: Path | io.BytesIO, fmt: str) -> Header:
    """The header (no pixels decoded): size, mode, and from EXIF the orientation (a portrait
    photo stored sideways is counted upright) and what a photo's owner may want to see."""
    try:
        with Image.open(source, formats=[fmt]) as im:
            width, height = im.size
            try:
                exif = _exif_of(im, fmt)
            except (OSError, SyntaxError, ValueError, TypeError, KeyError):
                exif = None  # broken EXIF: the pixels may still be fine
            if exif and exif.get(exifdata.ORIENTATION) in (5, 6, 7, 8):
                width, height = height, width
            frames = getattr(im, "n_frames", 1) if fmt in MULTI_FRAME else 1  # skips frames, decodes none
            return Header(width, height, im.mode, exifdata.photo_facts(exif) if exif else None, frames)
    except DECOMPRESSION_BOMB as e:  # more pixels than Image.MAX_IMAGE_PIXELS (main.py)
        raise BadInput(f"the uploaded {fmt} image has too many pixels: {pillow_reason(e)}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(f"the uploaded {fmt} image has a broken header: {pillow_reason(e)}") from e

#: What Pillow puts in its messages that is ours, not the client's: a buffer's repr, a path.
_OUR_OBJECTS = re.compile(r"\s*(<[\w.]+ object at 0x[0-9a-fA-F]+>|'[^']*/[^']*'|PosixPath\([^)]*\))")

def pillow_reason(e: BaseException) -> str:
    """Pillow's reason for refusing an image, in words for the client: without the repr of
    our buffer or the path of our temporary file, and short."""
    if isinstance(e, Image.UnidentifiedImageError):
        return "the image library cannot identify it (a corrupt or unsupported file)"
    return clipped(_OUR_OBJECTS.sub("", str(e)).strip(" :") or type(e).__name__)

#: Formats with more than one picture in a file (animations, TIFF pages).
MULTI_FRAME = frozenset({"GIF", "PNG", "WEBP", "TIFF"})

#: Formats whose EXIF Pillow reads from the header (for others it would decode the pixels first).
EXIF_IN_HEADER = frozenset({"JPEG", "TIFF", "WEBP"})

def _exif_of(im: Image.Image, fmt: str) -> Image.Exif | None:
    """The EXIF of an image, from its header only: a PNG's eXIf chunk if it comes before the
    pixels (as cameras and phones write it); a PNG's ``getexif()`` would decode the whole
    image looking for one after them (26 ms for a 720p frame)."""
    if fmt == "PNG":
        raw = im.info.get("exif")
        if not raw:
            return None
        exif = Image.Exif()
        exif.load(raw)
        return exif
    return im.getexif() if fmt in EXIF_IN_HEADER else None

def header_from_bytes(data: bytes) -> tuple[str, int, int, str]:
    """(format, width as seen, height as seen, mode) of a stored image."""
    fmt = sniff_format(data[:16]) or ""
    head = header_of(io.BytesIO(data), fmt) if fmt else None
    if head is None:
        raise BadInput("not an image")
    return fmt, head.width, head.height, head.mode

def jpeg_scans(chunks: Iterable[bytes]) -> int:
    """How many start-of-scan markers (FF DA) a JPEG has: how many passes decoding it takes.
    In entropy-coded data an FF is always followed by 00 or a restart marker, so every FF DA is
    a marker (an EXIF thumbnail's scans count too: a few more, never fewer)."""
    count, last = 0, 0
    for chunk in chunks:
        if not chunk:
            continue
        count += chunk.count(b"\xff\xda") + (last == 0xFF and chunk[0] == 0xDA)
        last = chunk[-1]
    return count

def file_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk

def tiff_result_problem(source: Path | io.BytesIO) -> str | None:
    try:
        with Image.open(source, formats=["TIFF"]) as im:
            return metadata.tiff_problem(list(im.tag_v2.keys()))  # type: ignore[attr-defined]
    except (OSError, SyntaxError, ValueError) as e:
        return f"the TIFF result is malformed: {pillow_reason(e)}"


def check_scans(scans: int, width: int, height: int, max_pixels: int) -> None:
    """A JPEG costs a decode per scan: :class:`BadInput` for one that would cost more than many
    images of the largest size accepted."""
    if scans > MAX_JPEG_SCANS or scans * width * height > MAX_JPEG_SCAN_IMAGES * max_pixels:
        raise BadInput(f"a progressive JPEG of {scans} scans ({width}x{height} pixels) would take too long"
                       f" to decode: at most {MAX_JPEG_SCANS} scans, and at most"
                       f" {MAX_JPEG_SCAN_IMAGES * max_pixels} scans x pixels, are accepted")
