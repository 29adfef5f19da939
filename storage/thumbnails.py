"""Thumbnails: scaled copies of stored images, made on first request (decoded reduced, upright,
without EXIF) by a few threads shared fairly between users.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from PIL import Image, ImageOps

from common.models import ImageType
from imaging import icc as icc_profiles
from imaging.formats import FORMATS

#: Thumbnail sizes: pixels on the long side, aspect kept (never enlarged).
THUMB_SIZES = {"small": 100, "medium": 300, "large": 600}

THUMB_THREADS = 2  # thumbnails made at once; others wait (uploads keep the default pool)

THUMB_THREADS_PER_USER = 1  # of those, one user's at most: a user's slow decodes never starve others

#: Decode and reduce to at least this many times the thumbnail's size, then resample properly.
THUMB_REDUCING_GAP = 2


#: What a thumbnail keeps of its image's info (an encoder writes what it finds there: a GIF's or
#: a JPEG's comment, a profile): how it is drawn, nothing said about it.
_KEPT_INFO = frozenset({"transparency", "background", "duration", "loop", "dpi"})


def thumb_key(workload_dir: str, type_: ImageType, image_id: int, fmt: str, size: str) -> str:
    return f"{workload_dir}/thumbs/{type_.value}-{image_id}-{size}.{FORMATS[fmt][0]}"

def make_thumbnail(source: bytes, px: int, fmt: str) -> bytes:
    """Decode reduced where the format allows (JPEG: at 1/2..1/8 scale via ``draft``), then
    shrink in steps: a 50 MP photo never becomes 150 MB of pixels for a 300 px preview. Upright
    (EXIF orientation applied) and without EXIF: no GPS position in what is shown around, nor
    any other text (a comment; an ICC profile keeps its colours only: :mod:`imaging.icc`)."""
    with Image.open(io.BytesIO(source)) as im:
        if im.format == "JPEG":
            im.draft(im.mode, (px * THUMB_REDUCING_GAP, px * THUMB_REDUCING_GAP))
        im.thumbnail((px, px), reducing_gap=THUMB_REDUCING_GAP)
        upright = ImageOps.exif_transpose(im)
        icc = upright.info.get("icc_profile")
        upright.info = {k: v for k, v in upright.info.items() if k in _KEPT_INFO}
        if icc and (clean := icc_profiles.scrubbed(icc, upright.mode)):
            upright.info["icc_profile"] = clean
        out = io.BytesIO()
        upright.save(out, fmt)  # Pillow writes EXIF only when asked to
        return out.getvalue()

#: Entered around a derived write: yields whether the workload is still there to write for.
Guard = Callable[[], AbstractAsyncContextManager[bool]]

class FairSlots:
    """``total`` slots shared by all, at most ``per_key`` of them for one key (a user) at once:
    one user's queue of slow work waits on its own turn, never in front of another's."""

    def __init__(self, total: int, per_key: int) -> None:
        self._all = asyncio.Semaphore(total)
        self._per_key = per_key
        self._keys: dict[str, tuple[asyncio.Semaphore, int]] = {}  # key -> (its slots, users)

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        own, users = self._keys.get(key) or (asyncio.Semaphore(self._per_key), 0)
        self._keys[key] = (own, users + 1)
        try:
            async with own, self._all:
                yield
        finally:
            own, users = self._keys[key]
            if users <= 1:
                del self._keys[key]
            else:
                self._keys[key] = (own, users - 1)
