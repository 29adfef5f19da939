"""ICC colour profiles without their text: what a result and a thumbnail keep of the original's.

A profile says how an image's numbers map to colours (a phone's Display P3, a camera's Adobe
RGB): drop it and the colours shift. But a profile also carries free text (its description, a
copyright, a device's maker and model, a vendor's private tags), which can be anything the
uploader wrote. :func:`scrubbed` rebuilds a profile from its colour tags only (curves, matrices,
lookup tables, white point, ...), with a neutral description and an empty copyright (the two
text tags a profile must have), and no maker, model, creator or profile ID in its header. The
pixels are untouched (converting to sRGB instead would cost a transform per image and lose the
wide-gamut colours a P3 photo has). Pure functions over bytes.
"""

from __future__ import annotations

import struct

#: Tag types that hold colour data only (ICC.1:2010 and v2), kept as they are.
COLOUR_TYPES = frozenset({b"curv", b"para", b"XYZ ", b"sf32", b"mft1", b"mft2", b"mAB ", b"mBA ", b"chrm",
                          b"sig ", b"view", b"meas", b"mpet", b"cicp", b"vcgt", b"uf32", b"ui08", b"ui16",
                          b"ui32", b"ui64"})
#: Text tags a profile must have, and the neutral text each gets.
NEUTRAL = {b"desc": "colour profile", b"cprt": ""}
#: A profile larger than this, or with more tags, is dropped rather than read.
MAX_PROFILE = 4 << 20
MAX_TAGS = 256
#: The header's fields that name a device or a program (4-byte signatures) and the profile's
#: MD5 (of the bytes it had): zeroed ("not given"), as the specification allows.
_ZEROED = ((48, 56), (80, 100))
#: Pillow's mode -> the colour space a profile for it describes.
_SPACES = {"RGB": b"RGB ", "RGBA": b"RGB ", "RGBX": b"RGB ", "P": b"RGB ", "PA": b"RGB ", "L": b"GRAY",
           "LA": b"GRAY", "La": b"GRAY", "1": b"GRAY", "I": b"GRAY", "I;16": b"GRAY", "F": b"GRAY",
           "CMYK": b"CMYK", "LAB": b"Lab ", "YCbCr": b"YCbr"}


def scrubbed(profile: bytes, mode: str | None = None) -> bytes | None:
    """``profile`` with its colour tags only and no free text; None when it cannot be read, or
    describes another colour space than an image of ``mode`` has (an RGB profile on a grayscale
    result: a reader would refuse it anyway)."""
    if not 132 <= len(profile) <= MAX_PROFILE or profile[36:40] != b"acsp":
        return None
    if mode is not None and _SPACES.get(mode, profile[16:20]) != profile[16:20]:
        return None
    count = struct.unpack(">I", profile[128:132])[0]
    if count > MAX_TAGS or 132 + 12 * count > len(profile):
        return None
    v4 = profile[8] >= 4
    tags: list[tuple[bytes, bytes]] = []
    for i in range(count):
        sig, offset, size = struct.unpack(">4sII", profile[132 + 12 * i:144 + 12 * i])
        data = profile[offset:offset + size]
        if size < 8 or offset + size > len(profile):
            return None
        if sig in NEUTRAL:
            tags.append((sig, _text(NEUTRAL[sig], v4, sig == b"desc")))
        elif data[:4] in COLOUR_TYPES:
            tags.append((sig, data))
    for sig in NEUTRAL:  # a profile without them is kept valid
        if all(s != sig for s, _ in tags):
            tags.append((sig, _text(NEUTRAL[sig], v4, sig == b"desc")))
    return _build(bytearray(profile[:128]), tags)


def _text(text: str, v4: bool, description: bool) -> bytes:
    """A text tag's data: ``mluc`` in a v4 profile; ``desc`` or ``text`` in a v2 one."""
    if v4:
        utf16 = text.encode("utf-16-be")
        return b"mluc" + bytes(4) + struct.pack(">II2s2sII", 1, 12, b"en", b"US", len(utf16), 28) + utf16
    ascii_ = text.encode("ascii") + b"\0"
    if description:  # textDescriptionType: ASCII, then empty Unicode and ScriptCode parts
        return b"desc" + bytes(4) + struct.pack(">I", len(ascii_)) + ascii_ + bytes(8) + bytes(3) + bytes(67)
    return b"text" + bytes(4) + ascii_


def _build(header: bytearray, tags: list[tuple[bytes, bytes]]) -> bytes:
    for start, end in _ZEROED:
        header[start:end] = bytes(end - start)
    table = bytearray(struct.pack(">I", len(tags)))
    body = bytearray()
    at = 128 + 4 + 12 * len(tags)
    placed: dict[bytes, int] = {}  # tags that shared their data still share it
    for sig, data in tags:
        offset = placed.get(data)
        if offset is None:
            offset = placed[data] = at + len(body)
            body += data + bytes(-len(data) % 4)
        table += struct.pack(">4sII", sig, offset, len(data))
    out = header + table + body
    out[0:4] = struct.pack(">I", len(out))
    return bytes(out)
