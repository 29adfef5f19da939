"""The image store: where image bytes live, named by keys ``<workload dir>/<type>/<id>.<ext>``.

Two kinds, one interface (:class:`ImageStore`): files under ``<data-dir>/images/`` (the
default, :mod:`storage.filestore`) or an S3-compatible bucket (:mod:`storage.s3`).
A workload's directory is its name, or ``<name>.<id prefix>`` when another user's workload
already has that name (names are unique per owner only).

Every upload is judged by its header (never fully decoded here) before it is kept. Into files,
an upload is streamed into a temporary file under ``<data-dir>/incoming/``, fsynced, then
renamed into place: a file at its final name is always complete. A small one (a small upload,
an inline result) is judged in memory and written, synced and renamed in one trip to a thread.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import io
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from common.models import BadInput, ImageType, NotFound, TooLarge, quoted
from imaging import facts, metadata
from imaging.formats import FORMATS, sniff_format
from storage import files, thumbnails
from storage.groupwrite import FileWrite

#: Files up to this size are kept in memory as they are received (a 720p frame is), so its job
#: carries them (a frame of :class:`plane.wire.Assign`) without reading them back.
KEEP_BYTES = 4 << 20
#: A PNG result of at most this many chunks is walked for metadata on the event loop.
QUICK_CHUNKS = 256

#: Bytes of recently stored small originals kept in memory, waiting for their jobs.
RECENT_BYTES = 64 << 20
#: Files up to this size are read in one trip to a thread and sent from memory (a 720p frame
#: a worker fetches): the event loop cannot sendfile on uvloop, and aiohttp's fallback reads
#: 256 KiB per trip. At most READ_BUDGET bytes are held so at once; beyond it, streamed.
SMALL_DOWNLOAD = 4 << 20
READ_BUDGET = 64 << 20

_FLUSH_BYTES = 1 << 20


def image_key(workload_dir: str, type_: ImageType, image_id: int, fmt: str) -> str:
    """Where an image lives in a store; ``workload_dir`` is ``Workload.dir`` (not its name)."""
    return f"{workload_dir}/{type_.value}/{image_id}.{FORMATS[fmt][0]}"

@dataclass(frozen=True)
class ReceivedImage:
    """A received image, judged by its header: in a temporary file under ``incoming/``, or
    only in memory until it is committed (small ones, and every one bound for an object store)."""

    path: Path | None
    format: str
    size: int
    width: int  # as it is seen: upright, once its EXIF orientation is applied
    height: int
    mode: str = ""  # Pillow's mode from the header: a grayscale result must be L or LA
    data: bytes | None = field(default=None, repr=False)  # the bytes too, when in memory
    photo: dict | None = None  # camera, time taken, GPS position (from EXIF), if any
    head: bytes = field(default=b"", repr=False)  # a direct result's first bytes, as judged
    frames: int = 1  # an animation's frames (a TIFF's pages)

@dataclass(frozen=True)
class Download:
    """How to send a stored image: a local file, its bytes read already, bytes in chunks, or a
    URL to redirect to. ``release`` is called once the response is sent (or failed)."""

    path: Path | None = None
    chunks: AsyncIterator[bytes] | None = None
    size: int | None = None
    url: str = ""
    data: bytes | None = None
    release: Callable[[], None] = lambda: None

class ImageStore(abc.ABC):
    """What every image store does: judge uploads, keep them at keys, hand them out, and keep
    the bytes of recent small originals in memory for their jobs."""

    #: Whether workers reach the store directly (presigned URLs) rather than through the API.
    direct = False
    #: Whether a write is seen whole or not at all (an object store's PUT): a result need not be
    #: placed "only if absent" (a file's O_EXCL, an object store's HEAD first), the datastore's
    #: row says whether one was recorded already.
    whole_writes = False

    def __init__(self, max_bytes: int, max_pixels: int) -> None:
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self._thumb_pool = ThreadPoolExecutor(thumbnails.THUMB_THREADS, thread_name_prefix="thumbs")
        self._thumb_slots = thumbnails.FairSlots(thumbnails.THUMB_THREADS, thumbnails.THUMB_THREADS_PER_USER)
        self._recent: OrderedDict[str, bytes] = OrderedDict()  # small stored originals, newest last
        self._recent_bytes = 0

    async def open(self) -> None:
        """Get ready (an object store: its bucket exists)."""

    async def close(self) -> None:
        self._thumb_pool.shutdown(wait=False, cancel_futures=True)

    # -- receiving --------------------------------------------------------------------------

    @abc.abstractmethod
    async def receive(self, chunks: AsyncIterator[bytes]) -> ReceivedImage:
        """Take an upload's bytes and judge them; then :meth:`commit` or :meth:`discard`."""

    async def receive_bytes(self, data: bytes) -> ReceivedImage:
        """An image already in memory (a small upload, a result that came back inline), judged
        like :meth:`receive`, and written only by :meth:`commit`."""
        if not data:
            raise BadInput("the uploaded file is empty")
        if len(data) > self.max_bytes:
            raise TooLarge(f"image larger than the limit of {self.max_bytes} bytes")
        fmt = sniff_format(data[:16])
        if fmt is None:
            raise BadInput("the uploaded file is not an image (unknown format)")
        head = facts.fast_header(data, fmt)  # an 8-bit PNG without EXIF: no Pillow, no thread
        if head is None:
            head = await asyncio.get_running_loop().run_in_executor(None, self._judged, data, fmt)
        self._check_pixels(head.width, head.height)
        return ReceivedImage(None, fmt, len(data), head.width, head.height, head.mode, data, head.photo,
                          frames=head.frames)

    def _judged(self, data: bytes, fmt: str) -> facts.Header:
        """In a thread: the header of an image in memory (a JPEG's scans counted too)."""
        head = facts.header_of(io.BytesIO(data), fmt)
        if fmt == "JPEG":
            self._check_pixels(head.width, head.height)  # the size first, as for a file
            facts.check_scans(facts.jpeg_scans([data]), head.width, head.height, self.max_pixels)
        return head

    async def _checked(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The upload's chunks, refused as soon as its first bytes are no image's or it grows
        past the size limit (before anything more is read)."""
        size = 0
        async for chunk in chunks:
            if size == 0 and len(chunk) >= 16 and sniff_format(chunk[:16]) is None:
                raise BadInput("the uploaded file is not an image (unknown format)")
            size += len(chunk)
            if size > self.max_bytes:
                raise TooLarge(f"image larger than the limit of {self.max_bytes} bytes")
            yield chunk

    async def _receive_in_memory(self, chunks: AsyncIterator[bytes]) -> ReceivedImage:
        """:meth:`receive` for stores that keep nothing on the server's disk."""
        return await self.receive_bytes(b"".join([chunk async for chunk in self._checked(chunks)]))

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise BadInput(f"image of {width}x{height} pixels exceeds the limit of {self.max_pixels}")

    #: Results recorded from this time on (time.time()) may have been lost with a crash: written
    #: unsynced (``durable=False``) and not yet synced when it came. None: none may have been.
    unsure_since: float | None = None

    def intact(self, key: str, size: int) -> bool:
        """In a thread: whether the image at ``key`` is there whole (``size`` bytes)."""
        return True

    @abc.abstractmethod
    async def commit(self, stored: ReceivedImage, key: str, replace: bool = True, keep: bool = False,
                     durable: bool = True) -> bool:
        """Put a received image at ``key``. With ``replace=False`` an existing image wins
        (returns False and drops the new one): that keeps result writes idempotent. With
        ``keep`` a small image's bytes stay in memory for :meth:`small_file` (an original, for
        its job). ``durable=False``: it need not be on disk when this returns (a result, which
        can be made again from its original: see :attr:`unsure_since`)."""

    def prepared(self, stored: ReceivedImage, key: str, replace: bool = True, keep: bool = False,
                 durable: bool = True) -> FileWrite | None:
        """:meth:`commit` as a write for the datastore to make just before the row that records
        it, in the same trip (:meth:`~storage.queries.SqlDatastore.write_with_files`), or None
        where this store cannot (then :meth:`commit` first). ``keep`` as for :meth:`commit`
        (the bytes are held from now; :meth:`forget` them if the write fails)."""
        return None

    async def discard(self, stored: ReceivedImage) -> None:
        """Drop a received image that was not committed."""

    async def without_metadata(self, stored: ReceivedImage) -> ReceivedImage:
        """A received result with its metadata dropped (whatever the worker put in: EXIF, a
        GPS position, text, a second picture); the same one if it had none. A TIFF result that
        carries metadata is refused (:class:`BadInput`): TIFF is not rewritten here."""
        loop = asyncio.get_running_loop()
        if stored.format == "TIFF":
            source = io.BytesIO(stored.data) if stored.data is not None else stored.path
            assert source is not None
            problem = await loop.run_in_executor(None, facts.tiff_result_problem, source)
            if problem:
                raise BadInput(problem)
            return stored
        if stored.data is not None:
            try:
                # A small image, or a PNG of few chunks (a 720p frame has ~25): walked here, as a
                # thread trip costs more; any other, in a thread.
                quick = len(stored.data) <= 65536 or metadata.few_pieces(stored.data, stored.format, QUICK_CHUNKS)
                clean = metadata.stripped(stored.data, stored.format) if quick else \
                    await loop.run_in_executor(None, metadata.stripped, stored.data, stored.format)
            except metadata.Malformed as e:
                raise BadInput(f"the {stored.format} result is malformed: {e}") from e
            if clean is stored.data:
                return stored
            return dataclasses.replace(stored, data=clean, size=len(clean), path=None)
        assert stored.path is not None
        try:
            size = await loop.run_in_executor(None, files.strip_file, stored.path, stored.format, self._fsync())
        except metadata.Malformed as e:
            raise BadInput(f"the {stored.format} result is malformed: {e}") from e
        return stored if size is None else dataclasses.replace(stored, size=size)

    def _fsync(self) -> bool:
        return True

    # -- handing out ------------------------------------------------------------------------

    @abc.abstractmethod
    async def download(self, key: str, content_type: str, whole: bool = False) -> Download:
        """How to send the image at ``key`` to a client; ``whole``: a small one's bytes in
        memory are welcome (the client wants all of it, no range)."""

    @abc.abstractmethod
    async def read(self, key: str) -> bytes:
        """The bytes at ``key`` (``FileNotFoundError`` if there are none)."""

    @abc.abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def write(self, key: str, data: bytes) -> None:
        """Put ``data`` at ``key`` (a thumbnail: derived data, no durability needed)."""

    async def small_file(self, key: str, size: int, limit: int) -> bytes | None:
        """The bytes of a stored image of ``size`` bytes if at most ``limit`` (from memory if
        it was stored recently), or None if it is larger. An object store's are only ever
        given from memory: its workers read the rest themselves (never relayed by the server)."""
        if size > limit:
            return None
        data = self._recent.get(key)
        if data is not None or self.direct:
            return data
        return await self.read(key)

    def remembered(self, key: str) -> bool:
        """Whether an image's bytes are in memory (:meth:`small_file` gives them without a read)."""
        return key in self._recent

    def forget(self, key: str) -> None:
        """Drop an image's bytes from memory (its job is done with it)."""
        data = self._recent.pop(key, None)
        if data is not None:
            self._recent_bytes -= len(data)

    def _remember(self, key: str, data: bytes) -> None:
        self.forget(key)
        self._recent[key] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > RECENT_BYTES:
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= len(old)

    async def thumbnail(self, workload_dir: str, type_: ImageType, image_id: int, fmt: str, size: str,
                        owner: str = "", guard: thumbnails.Guard | None = None) -> str:
        """The key of a scaled copy, made on first request and kept under ``<workload>/thumbs/``.
        Stored images never change (ids are not reused, results are first-wins, a directory
        is never given to a second workload), so neither do these. ``owner``'s thumbnails take
        at most :data:`thumbnails.THUMB_THREADS_PER_USER` of the threads; ``guard`` is entered around the
        write and says whether the workload still exists (a delete may come while decoding):
        if not, nothing is written and the image is :class:`NotFound`."""
        px = thumbnails.THUMB_SIZES.get(size)
        if px is None:
            raise BadInput(f"size must be one of {', '.join(thumbnails.THUMB_SIZES)}, got {quoted(size)}")
        key = thumbnails.thumb_key(workload_dir, type_, image_id, fmt, size)
        if await self.exists(key):
            return key
        source = await self.read(image_key(workload_dir, type_, image_id, fmt))
        async with self._thumb_slots.turn(owner):  # a gallery asks for dozens at once; decoding is heavy
            try:
                data = await asyncio.get_running_loop().run_in_executor(
                    self._thumb_pool, thumbnails.make_thumbnail, source, px, fmt)
            except (OSError, SyntaxError, ValueError, *facts.DECOMPRESSION_BOMB) as e:
                raise BadInput(f"{type_.value} image {image_id} cannot be decoded for a thumbnail:"
                               f" {facts.pillow_reason(e)}") from e
        if guard is None:
            await self.write(key, data)
            return key
        async with guard() as alive:
            if not alive:
                raise NotFound(f"{type_.value} image {image_id} not found (its workload was deleted)")
            await self.write(key, data)
        return key

    @abc.abstractmethod
    async def remove(self, key: str) -> None:
        """Drop the image at ``key`` if there is one (a write that lost to a delete)."""

    @abc.abstractmethod
    async def remove_workload(self, workload_dir: str) -> int:
        """Every image (and thumbnail) of a workload; how many were removed."""

    def _forget_prefix(self, prefix: str) -> None:
        for key in [k for k in self._recent if k.startswith(prefix)]:
            self.forget(key)

    def space(self) -> tuple[int, int] | None:
        """(free, total) bytes where images are kept, or None if unknown (an object store)."""
        return None

    # -- workers' direct access (object stores) --------------------------------------------

    async def job_urls(self, original: str, result: str, expires_in: float) -> tuple[str, str] | None:
        """URLs a worker may GET the original from and PUT the result to, for ``expires_in``
        seconds, or None if workers go through the API."""
        return None

    async def stored_result(self, key: str) -> ReceivedImage | None:
        """A result a worker put at ``key`` itself, judged by its header; None if there is none."""
        return None

    async def clean_stored_result(self, key: str, stored: ReceivedImage) -> ReceivedImage:
        """:meth:`without_metadata` for a result a worker put at ``key`` itself."""
        return stored
