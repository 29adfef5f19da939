"""Image formats DPIP accepts, recognised by their first bytes."""

from __future__ import annotations

import zlib

from common import models

MAX_PIXELS = models.MAX_PIXELS  # the pixel limit (its default; the server's --max-pixels)

#: Pillow's modes of more than 8 bits a band (16- and 32-bit integers, 32-bit floats): all grayscale.
DEEP_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
#: Pillow's modes with an alpha band.
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})

#: Pillow's modes that are grayscale.
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La"}) | DEEP_MODES
#: Where a format cannot say "grayscale" in its header, the modes a grayscale result may have:
#: a GIF is a palette (Pillow reads it as L only when its palette is exactly the gray ramp,
#: never with a transparent colour); a WebP is always RGB or RGBA to Pillow.
GRAYSCALE_RESULT_MODES = {"GIF": frozenset({"L", "P"}), "WEBP": frozenset({"RGB", "RGBA"})}

#: format name (as Pillow says it) -> (file extension, Content-Type)
FORMATS: dict[str, tuple[str, str]] = {
    "PNG": ("png", "image/png"),
    "JPEG": ("jpg", "image/jpeg"),
    "GIF": ("gif", "image/gif"),
    "BMP": ("bmp", "image/bmp"),
    "WEBP": ("webp", "image/webp"),
    "TIFF": ("tiff", "image/tiff"),
}

_MAGIC: list[tuple[bytes, str]] = [
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
]


def sniff_format(head: bytes) -> str | None:
    """The image format named by the first bytes of a file, or None."""
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


#: 8-bit PNG colour types and the mode Pillow gives them (other depths: ask Pillow)
_PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}


def png_header(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, Pillow's mode) of an 8-bit PNG from its IHDR chunk (CRC checked), or None
    when it is not one (then Pillow reads the header): the header check of every small upload
    without opening the image."""
    if len(data) < 33 or not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR":
        return None
    if int.from_bytes(data[8:12], "big") != 13 or zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big"):
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour = data[24], data[25]
    mode = _PNG_MODES.get(colour)
    if depth != 8 or mode is None or width == 0 or height == 0:
        return None
    return width, height, mode
