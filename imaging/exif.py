"""What a photo's EXIF says that its owner may want to see: the camera, when it was taken, where.

Read from the original's header at upload (Pillow's ``getexif``, no pixels decoded), kept with
the image's row and listed to its owner only; results and thumbnails carry no EXIF at all. The
values come from the file, so from anyone: each is bounded, printable and of the right type.
"""

from __future__ import annotations

import math
from typing import Any

ORIENTATION = 0x0112
MAKE, MODEL = 0x010F, 0x0110
DATETIME = 0x0132
EXIF_IFD, GPS_IFD = 0x8769, 0x8825
DATETIME_ORIGINAL = 0x9003
GPS_LAT_REF, GPS_LAT, GPS_LON_REF, GPS_LON = 1, 2, 3, 4
MAX_TEXT = 64


def photo_facts(exif: Any) -> dict | None:
    """``{"camera", "taken_at", "gps": {"lat", "lon"}}`` (each only if present), or None."""
    facts: dict[str, Any] = {}
    camera = " ".join(t for t in (_text(exif.get(MAKE)), _text(exif.get(MODEL))) if t)
    if camera:
        facts["camera"] = camera[:MAX_TEXT]
    try:
        taken = _text(exif.get_ifd(EXIF_IFD).get(DATETIME_ORIGINAL)) or _text(exif.get(DATETIME))
    except (KeyError, ValueError, TypeError, OSError):
        taken = _text(exif.get(DATETIME))
    if taken:
        facts["taken_at"] = _iso(taken)
    try:
        gps = exif.get_ifd(GPS_IFD)
    except (KeyError, ValueError, TypeError, OSError):
        gps = {}
    lat = _degrees(gps.get(GPS_LAT), gps.get(GPS_LAT_REF), 90)
    lon = _degrees(gps.get(GPS_LON), gps.get(GPS_LON_REF), 180)
    if lat is not None and lon is not None:
        facts["gps"] = {"lat": round(lat, 6), "lon": round(lon, 6)}
    return facts or None


def _text(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return ""
    return "".join(c for c in value if c.isprintable()).strip().rstrip("\x00")[:MAX_TEXT]


def _iso(taken: str) -> str:
    """EXIF's ``YYYY:MM:DD HH:MM:SS`` as ``YYYY-MM-DDTHH:MM:SS``; anything else as it is."""
    date, _, clock = taken.partition(" ")
    parts = date.split(":")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and clock:
        return f"{'-'.join(parts)}T{clock}"
    return taken


def _degrees(value: object, ref: object, limit: float) -> float | None:
    """Degrees, minutes, seconds (rationals) and a hemisphere as signed decimal degrees."""
    try:
        d, m, s = (float(x) for x in value)  # type: ignore[union-attr]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    degrees = d + m / 60 + s / 3600
    if not math.isfinite(degrees) or not 0 <= degrees <= limit:
        return None
    hemisphere = _text(ref).upper()[:1]
    return -degrees if hemisphere in ("S", "W") else degrees
