"""Metadata out of results: whoever stores a result strips it, whatever the worker sent.

An honest worker saves results without EXIF (no GPS position leaves with a result); a worker
that lies could add any (a made-up position, a comment, a second picture after the first). So
the server keeps, of each result, only what draws the image, by walking the file's own structure
(no decoding, no re-encoding): it returns the byte ranges to keep, or None when there is nothing
to drop (an honest worker's result: then nothing is copied). Pure functions over bytes or a
memory map.

- PNG: critical chunks and the ancillary ones that change how pixels look (transparency,
  gamma, colour space, ICC profile, significant bits, background, pixel size, histogram,
  animation control); never eXIf, text (tEXt, zTXt, iTXt), time, or private chunks.
- JPEG: the segments a decoder needs (tables, frame and scan headers, restart intervals, the
  entropy-coded data) and the JFIF, ICC and Adobe colour segments; never EXIF/XMP (APP1), IPTC,
  other APPn or comments, nor anything after the end-of-image marker.
- WebP: the image, alpha, animation and ICC chunks; never EXIF or XMP (their flags cleared).
- GIF: images, their graphic controls and the looping extension; never comments, plain text or
  other application extensions (where XMP goes).
- TIFF keeps its metadata inside the directory that describes the image: not rewritten here;
  :func:`tiff_problem` says when a TIFF result carries any (it is then refused).
- BMP has none.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import Protocol

Ranges = list[tuple[int, int]]


class Buffer(Protocol):
    """bytes, or an mmap of a file: what the walkers read."""

    def __len__(self) -> int: ...
    def __getitem__(self, key, /): ...  # noqa: ANN001 - int or slice, like bytes
    def find(self, sub: bytes, start: int = ..., end: int = ..., /) -> int: ...


class Malformed(ValueError):
    """The file's structure is broken where metadata would be looked for."""


def keep_ranges(data: Buffer, fmt: str) -> Ranges | None:
    """The byte ranges of ``data`` to keep (in order) to drop its metadata, or None if it has
    none. :class:`Malformed` when its structure is broken."""
    walker = _WALKERS.get(fmt)
    return walker(data) if walker is not None else None


def few_pieces(data: bytes, fmt: str, most: int) -> bool:
    """Whether ``data`` (a PNG) has at most ``most`` chunks: walking it is then a few
    microseconds, short enough for the event loop (a crafted one of a million one-byte chunks is
    walked in a thread instead). False for other formats (their walk may read every byte)."""
    if fmt != "PNG" or not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    pos, total = 8, len(data)
    for _ in range(most):
        if pos + 8 > total or data[pos + 4:pos + 8] == b"IEND":
            return True  # (truncated: the walk itself says so)
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return pos >= total


def stripped(data: bytes, fmt: str) -> bytes:
    """``data`` without its metadata (``data`` itself when it has none)."""
    ranges = keep_ranges(data, fmt)
    return data if ranges is None else join(data, ranges, fmt)


def join(data: Buffer, ranges: Ranges, fmt: str) -> bytes:
    """The kept ranges as one file (a WebP's header and flags fixed up)."""
    out = b"".join(bytes(data[a:b]) for a, b in ranges)
    return _fix_webp(out) if fmt == "WEBP" else out


def _simplify(ranges: Ranges, total: int) -> Ranges | None:
    """Merge adjacent ranges; None when they are the whole file."""
    merged: Ranges = []
    for a, b in ranges:
        if a == b:
            continue
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return None if merged == [(0, total)] else merged


# -- PNG ----------------------------------------------------------------------------------

PNG_KEEP = frozenset({b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT", b"bKGD", b"pHYs", b"hIST",
                      b"acTL", b"fcTL", b"fdAT", b"cICP", b"mDCV", b"cLLI"})


def _png(data: Buffer) -> Ranges | None:
    if bytes(data[:8]) != b"\x89PNG\r\n\x1a\n":
        raise Malformed("not a PNG")
    keep: Ranges = [(0, 8)]
    pos, total = 8, len(data)
    while pos < total:
        if pos + 12 > total:
            raise Malformed("truncated PNG chunk")
        length = struct.unpack(">I", bytes(data[pos:pos + 4]))[0]
        kind = bytes(data[pos + 4:pos + 8])
        end = pos + 12 + length
        if end > total:
            raise Malformed("truncated PNG chunk")
        critical = kind[:1].isupper()
        if critical or kind in PNG_KEEP:
            keep.append((pos, end))
        if kind == b"IEND":
            break  # anything after the end is dropped with it
        pos = end
    else:
        raise Malformed("PNG without IEND")
    return _simplify(keep, total)


# -- JPEG ---------------------------------------------------------------------------------

#: Markers without a length: SOI, EOI, RST0-7, TEM.
_STANDALONE = frozenset({0xD8, 0xD9, 0x01, *range(0xD0, 0xD8)})
_APP_KEEP = {0xE0: (b"JFIF\x00",), 0xE2: (b"ICC_PROFILE\x00",), 0xEE: (b"Adobe",)}
#: A marker in entropy-coded data: FF followed by neither 00 (a stuffed FF) nor a restart.
_NEXT_MARKER = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")


def _jpeg(data: Buffer) -> Ranges | None:
    if bytes(data[:2]) != b"\xff\xd8":
        raise Malformed("not a JPEG")
    keep: Ranges = [(0, 2)]
    pos, total = 2, len(data)
    while True:
        while pos < total and data[pos] == 0xFF and pos + 1 < total and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 2 > total or data[pos] != 0xFF:
            raise Malformed("JPEG marker expected")
        marker = data[pos + 1]
        if marker == 0xD9:  # end of image: whatever follows (a second picture, a trailer) goes
            keep.append((pos, pos + 2))
            return _simplify(keep, total)
        if marker in _STANDALONE:
            keep.append((pos, pos + 2))
            pos += 2
            continue
        if pos + 4 > total:
            raise Malformed("truncated JPEG segment")
        end = pos + 2 + struct.unpack(">H", bytes(data[pos + 2:pos + 4]))[0]
        if end > total:
            raise Malformed("truncated JPEG segment")
        if marker == 0xFE or 0xE0 <= marker <= 0xEF:
            signatures = _APP_KEEP.get(marker, ())
            if any(bytes(data[pos + 4:pos + 4 + len(sig)]) == sig for sig in signatures):
                keep.append((pos, end))
        else:
            keep.append((pos, end))
        pos = end
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            found = _NEXT_MARKER.search(data, pos)  # type: ignore[call-overload]
            if found is None:
                raise Malformed("JPEG scan without an end")
            keep.append((pos, found.start()))
            pos = found.start()


# -- WebP ---------------------------------------------------------------------------------

WEBP_KEEP = frozenset({b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF", b"ICCP"})
_VP8X_EXIF, _VP8X_XMP = 0x08, 0x04


def _webp(data: Buffer) -> Ranges | None:
    if bytes(data[:4]) != b"RIFF" or bytes(data[8:12]) != b"WEBP":
        raise Malformed("not a WebP")
    keep: Ranges = [(0, 12)]
    pos = 12
    riff_end = 8 + struct.unpack("<I", bytes(data[4:8]))[0]
    if riff_end > len(data) or riff_end <= 12:
        raise Malformed("truncated WebP")
    dirty = riff_end != len(data)  # something after the RIFF: dropped
    while pos < riff_end:
        if pos + 8 > riff_end:
            raise Malformed("truncated WebP chunk")
        kind = bytes(data[pos:pos + 4])
        size = struct.unpack("<I", bytes(data[pos + 4:pos + 8]))[0]
        end = pos + 8 + size + (size & 1)
        if end > riff_end:
            raise Malformed("truncated WebP chunk")
        if kind in WEBP_KEEP:
            keep.append((pos, end))
            if kind == b"VP8X" and size >= 1 and data[pos + 8] & (_VP8X_EXIF | _VP8X_XMP):
                dirty = True
        else:
            dirty = True
        pos = end
    ranges = _simplify(keep, len(data))
    if ranges is None and dirty:
        ranges = [(0, len(data))]
    return ranges


def _fix_webp(out: bytes) -> bytes:
    """The RIFF size of what is kept, and the VP8X flags of what is gone."""
    body = bytearray(out)
    body[4:8] = struct.pack("<I", len(body) - 8)
    if body[12:16] == b"VP8X" and len(body) > 20:
        body[20] &= ~(_VP8X_EXIF | _VP8X_XMP) & 0xFF
    return bytes(body)


# -- GIF ----------------------------------------------------------------------------------

_GIF_LOOPING = (b"NETSCAPE2.0", b"ANIMEXTS1.0")


def _gif_sub_blocks(data: Buffer, pos: int) -> int:
    """The position after a chain of sub-blocks starting at ``pos``."""
    total = len(data)
    while True:
        if pos >= total:
            raise Malformed("truncated GIF block")
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos


def _gif(data: Buffer) -> Ranges | None:
    if bytes(data[:6]) not in (b"GIF87a", b"GIF89a") or len(data) < 13:
        raise Malformed("not a GIF")
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    keep: Ranges = [(0, pos)]
    total = len(data)
    while True:
        if pos >= total:
            raise Malformed("GIF without a trailer")
        introducer = data[pos]
        if introducer == 0x3B:  # trailer: the end (what follows goes)
            keep.append((pos, pos + 1))
            return _simplify(keep, total)
        if introducer == 0x2C:  # an image: descriptor, local colour table, LZW data
            if pos + 10 > total:
                raise Malformed("truncated GIF image")
            local = data[pos + 9]
            start, pos = pos, pos + 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
            end = _gif_sub_blocks(data, pos + 1)
            keep.append((start, end))
            pos = end
        elif introducer == 0x21:
            if pos + 2 > total:
                raise Malformed("truncated GIF extension")
            label = data[pos + 1]
            end = _gif_sub_blocks(data, pos + 2)
            application = bytes(data[pos + 3:pos + 14]) if label == 0xFF else b""
            if label == 0xF9 or application in _GIF_LOOPING:
                keep.append((pos, end))
            pos = end
        else:
            raise Malformed("bad GIF block")


#: TIFF tags that are metadata, not image: EXIF and GPS directories, XMP, IPTC, Photoshop,
#: ICC aside (it is colour), free text fields.
TIFF_METADATA_TAGS = {34665: "EXIF", 34853: "GPS", 700: "XMP", 33723: "IPTC", 34377: "Photoshop",
                      270: "ImageDescription", 315: "Artist", 305: "Software", 306: "DateTime",
                      316: "HostComputer", 33432: "Copyright", 37724: "ImageSourceData"}


def tiff_problem(tags: Sequence[int]) -> str | None:
    """Why a TIFF result with these tags (of its first directory) cannot be stored: it carries
    metadata, which is not rewritten out of TIFF files."""
    found = sorted({TIFF_METADATA_TAGS[t] for t in tags if t in TIFF_METADATA_TAGS})
    return f"a TIFF result carries metadata ({', '.join(found)})" if found else None


_WALKERS = {"PNG": _png, "JPEG": _jpeg, "WEBP": _webp, "GIF": _gif}

#: Bytes that metadata of each format begins with. Seen anywhere in a part of a file, the whole
#: file is walked (a false alarm costs a read, never a wrong result).
_SIGNS = {"PNG": (b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"tIME"), "JPEG": (b"\xff\xe1", b"\xff\xfe", b"\xff\xed"),
          "WEBP": (b"EXIF", b"XMP "), "GIF": (b"\x21\xfe", b"\x21\xff", b"\x21\x01")}


def may_have_metadata(part: bytes, fmt: str) -> bool:
    """Whether ``part`` of a file (its beginning, or its end) shows a sign of metadata. A PNG's
    beginning is walked chunk by chunk (a few headers, where searching 256 KiB for five signs
    cost the server a millisecond per 720p result)."""
    if fmt == "PNG" and part.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_head_has_metadata(part)
    return any(sign in part for sign in _SIGNS.get(fmt, ()))


def _png_head_has_metadata(part: bytes) -> bool:
    """Whether a chunk that starts within ``part`` (a PNG's first bytes) is one of metadata."""
    signs = _SIGNS["PNG"]
    pos = 8
    while pos + 8 <= len(part):
        length = int.from_bytes(part[pos:pos + 4], "big")
        kind = part[pos + 4:pos + 8]
        if kind in signs:
            return True
        if kind == b"IEND":
            return False
        pos += 12 + length
    return False
