"""Images in an S3-compatible bucket (``--image-store s3://BUCKET[/PREFIX]``), for deployments
past one machine: no image byte touches a server's disk, and workers read originals and write
results straight to the bucket through presigned URLs good for one job.

The endpoint, the keys and the region come the AWS SDK's own way (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, or a profile). The
bucket is created if missing. Uploads are judged in memory (at most ``--max-upload-bytes``
each) and put whole. A store that cannot be reached is :class:`~common.models.Unavailable`
(503), one that is full :class:`~common.models.InsufficientStorage` (507).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from common.models import BadInput, InsufficientStorage, Unavailable
from imaging import metadata
from imaging.facts import fast_header, header_of
from imaging.formats import sniff_format
from storage.images import KEEP_BYTES, Download, ImageStore, ReceivedImage
from storage.presign import Credentials, Presigner

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: Bytes of a result read to judge its header (PNG's is in the first 33; JPEG's may be later).
HEADER_BYTES = 256 * 1024
CHUNK = 256 * 1024
#: How long a redirect to a download stays good.
REDIRECT_SECONDS = 300
#: How long a URL this server presigns for its own request stays good.
PRESIGNED_SECONDS = 60


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET[/PREFIX]`` -> (bucket, prefix ending in ``/`` or empty)."""
    if not url.startswith("s3://"):
        raise ValueError(f"an S3 image store is s3://BUCKET[/PREFIX], not {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError("s3:// needs a bucket name")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


#: The end of a result looked at for metadata (PNG and WebP put it after the pixels).
TAIL_BYTES = 64 * 1024


class S3ImageStore(ImageStore):
    """Images as objects of one bucket, under an optional prefix."""

    direct = True
    whole_writes = True

    def __init__(self, url: str, max_bytes: int, max_pixels: int, redirect_downloads: bool = False,
                 timeout: float = 30.0) -> None:
        super().__init__(max_bytes, max_pixels)
        self.bucket, self.prefix = parse_s3_url(url)
        self.redirect_downloads = redirect_downloads
        self.timeout = timeout
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._credentials: Any = None  # the SDK's (refreshed by it, if they expire)
        self._signer: Presigner | None = None
        self._http: aiohttp.ClientSession | None = None  # requests to URLs presigned here (_presigned)

    async def open(self) -> None:
        config = AioConfig(connect_timeout=5, read_timeout=self.timeout, retries={"max_attempts": 2},
                           s3={"addressing_style": "path"}, signature_version="s3v4")
        session = get_session()
        self._client = await self._stack.enter_async_context(session.create_client("s3", config=config))
        self._credentials = await session.get_credentials()
        if self._credentials is not None:  # (none: the SDK's own presigning says what is missing)
            self._signer = Presigner(self._client.meta.endpoint_url, self._client.meta.region_name or "us-east-1")
        trust = None
        if bundle := os.environ.get("AWS_CA_BUNDLE"):  # the SDK's own variable, trusted the same way
            trust = ssl.create_default_context()
            trust.load_verify_locations(bundle)
        self._http = await self._stack.enter_async_context(aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout, connect=5),
            connector=aiohttp.TCPConnector(ssl=trust) if trust is not None else None))
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if _status(e) not in (403, 404):
                raise RuntimeError(f"cannot use bucket {self.bucket}: {e}") from e
            if _status(e) == 403:
                raise RuntimeError(f"not allowed to use bucket {self.bucket}: {e}") from e
            await self._client.create_bucket(Bucket=self.bucket)
            logger.info("created bucket %s", self.bucket)
        except BotoCoreError as e:
            await self.close()
            raise RuntimeError(f"cannot reach the object store for bucket {self.bucket}: {e}") from e
        logger.info("image store: s3://%s/%s at %s", self.bucket, self.prefix, self._client.meta.endpoint_url)

    async def close(self) -> None:
        await super().close()
        await self._stack.aclose()

    def _key(self, key: str) -> str:
        return self.prefix + key

    async def _url(self, method: str, key: str, expires: int, params: dict[str, str] | None = None) -> str:
        """A URL for ``method`` on ``key``, presigned here (:mod:`storage.presign`: a few
        microseconds, where botocore's took 0.19 ms of CPU) with the SDK's credentials."""
        if self._signer is None:
            operation = "put_object" if method == "PUT" else "get_object"
            sdk_params = {"Bucket": self.bucket, "Key": self._key(key)}
            if params and "response-content-type" in params:
                sdk_params["ResponseContentType"] = params["response-content-type"]
            return await self._call(key, lambda: self._client.generate_presigned_url(
                operation, Params=sdk_params, ExpiresIn=expires))
        frozen = await self._credentials.get_frozen_credentials()
        return self._signer.url(method, self.bucket, self._key(key), expires,
                                Credentials(frozen.access_key, frozen.secret_key, frozen.token or ""), params)

    async def _call(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """An S3 call, its failures said the way the API answers them."""
        try:
            return await operation()
        except ClientError as e:
            said = _said(what, _status(e), e.response.get("Error", {}).get("Code", ""))
            if said is not None:
                raise said from e
            raise
        except (BotoCoreError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise Unavailable(f"the object store is unavailable ({type(e).__name__}); try again shortly") from e

    # -- receiving --------------------------------------------------------------------------

    async def receive(self, chunks: AsyncIterator[bytes]) -> ReceivedImage:
        return await self._receive_in_memory(chunks)

    async def commit(self, stored: ReceivedImage, key: str, replace: bool = True, keep: bool = False,
                     durable: bool = True) -> bool:
        assert stored.data is not None
        if not replace and await self.exists(key):
            return False
        await self.write(key, stored.data)
        if keep and len(stored.data) <= KEEP_BYTES:
            self._remember(key, stored.data)
        return True

    async def small_file(self, key: str, size: int, limit: int) -> bytes | None:
        """Only what is still in memory: otherwise the worker reads the store itself (the
        server relays no job traffic)."""
        return self._recent.get(key) if size <= limit else None

    # -- handing out ------------------------------------------------------------------------

    async def download(self, key: str, content_type: str, whole: bool = False) -> Download:
        if self.redirect_downloads:
            return Download(url=await self._url("GET", key, REDIRECT_SECONDS, {"response-content-type": content_type}))
        response = await self._call(key, lambda: self._client.get_object(Bucket=self.bucket, Key=self._key(key)))
        body = response["Body"]

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await self._call(key, lambda: body.read(CHUNK)):
                    yield chunk
            finally:
                body.close()

        return Download(chunks=chunks(), size=response.get("ContentLength"))

    async def read(self, key: str) -> bytes:
        async def get() -> bytes:
            response = await self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            async with response["Body"] as body:
                return await body.read()
        return await self._call(key, get)

    async def exists(self, key: str) -> bool:
        try:
            await self._call(key, lambda: self._client.head_object(Bucket=self.bucket, Key=self._key(key)))
        except FileNotFoundError:
            return False
        return True

    async def write(self, key: str, data: bytes) -> None:
        """A PUT to a URL presigned here for this key, sent with aiohttp, as workers put their
        results: measured, 1.58 ms of server CPU per small object through aiobotocore's
        ``put_object`` (its hooks, a checksum and, over http://, a hash of the body), 0.85 ms
        this way (with botocore's presign, 0.19 of it; now presigned here: see _url)."""
        await self._presigned("PUT", key, data=data)

    async def _presigned(self, method: str, key: str, data: bytes = b"", byte_range: str = "",
                         most: int = 0) -> tuple[bytes, int]:
        """One request to a URL presigned here, sent with aiohttp (nothing of the SDK runs):
        a PUT of ``data``, or a GET of ``byte_range`` reading at most
        ``most`` bytes; (what was read, the object's whole size). FileNotFoundError if there is
        no such object; an empty one read by range gives (b"", 0)."""
        assert self._http is not None, "open() first"
        url = await self._url(method, key, PRESIGNED_SECONDS)
        try:
            async with self._http.request(method, url, data=data if method == "PUT" else None,
                                          headers={"Range": byte_range} if byte_range else None) as r:
                if r.status in (200, 201, 204, 206):
                    pieces: list[bytes] = []
                    got = 0
                    while got < most and (piece := await r.content.read(most - got)):  # (read gives
                        pieces.append(piece)  # what has arrived: up to, not exactly, what is asked)
                        got += len(piece)
                    body = b"".join(pieces)
                    return body, _total_size(r.headers.get("Content-Range"), r.content_length or len(body))
                text = (await r.content.read(4096)).decode("utf-8", "replace")
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise Unavailable(f"the object store is unavailable ({type(e).__name__}); try again shortly") from e
        code = text.partition("<Code>")[2].partition("</Code>")[0]
        if r.status == 416 or code == "InvalidRange":
            return b"", 0
        raise _said(key, r.status, code) or RuntimeError(f"the object store refused {method} {key}: HTTP {r.status} {code}")

    async def remove(self, key: str) -> None:
        self.forget(key)
        await self._call(key, lambda: self._client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    async def remove_workload(self, workload_dir: str) -> int:
        self._forget_prefix(f"{workload_dir}/")
        return await self.remove_prefix(f"{workload_dir}/")

    async def remove_prefix(self, prefix: str) -> int:
        """Every object under ``prefix`` (a workload's ``dir/``); how many were removed."""
        removed = 0
        paginator = self._client.get_paginator("list_objects_v2")

        async def pages() -> list[list[str]]:
            out = []
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                out.append([o["Key"] for o in page.get("Contents", [])])
            return out

        for keys in await self._call(prefix, pages):
            for start in range(0, len(keys), 1000):
                batch = keys[start:start + 1000]
                if batch:
                    await self._call(prefix, lambda b=batch: self._client.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in b], "Quiet": True}))
                    removed += len(batch)
        return removed

    # -- workers' direct access -------------------------------------------------------------

    async def job_urls(self, original: str, result: str, expires_in: float) -> tuple[str, str]:
        seconds = max(1, int(expires_in))
        return await self._url("GET", original, seconds), await self._url("PUT", result, seconds)

    async def stored_result(self, key: str) -> ReceivedImage | None:
        """Judge a result a worker put: its size (at most the upload limit) and its header, in
        one request (a ranged GET of its first bytes says the whole size too: no HEAD before it)."""
        try:  # (at most HEADER_BYTES read, should a store ignore the range)
            data, size = await self._presigned("GET", key, byte_range=f"bytes=0-{HEADER_BYTES - 1}", most=HEADER_BYTES)
        except FileNotFoundError:
            return None
        if size == 0 or size > self.max_bytes:
            return None
        fmt = sniff_format(data[:16])
        if fmt is None:
            return None
        head = fast_header(data, fmt)
        if head is None:
            try:
                head = await asyncio.get_running_loop().run_in_executor(None, header_of, io.BytesIO(data), fmt)
            except BadInput:
                return None
        return ReceivedImage(None, fmt, size, head.width, head.height, head.mode, head=data)


    async def clean_stored_result(self, key: str, stored: ReceivedImage) -> ReceivedImage:
        """Its first and last bytes are looked at for signs of metadata (where every format
        puts it: before or after the pixels); only then is the whole object read, stripped and
        written back. (Metadata hidden in the middle of a large result is not looked for: the
        server would have to read every result.)"""
        head = stored.head or (await self._presigned("GET", key, byte_range=f"bytes=0-{HEADER_BYTES - 1}",
                                                     most=HEADER_BYTES))[0]
        suspicious = stored.format == "TIFF" or metadata.may_have_metadata(head, stored.format)
        if not suspicious and stored.size > len(head):
            tail = (await self._presigned("GET", key, byte_range=f"bytes=-{TAIL_BYTES}", most=TAIL_BYTES))[0]
            suspicious = metadata.may_have_metadata(tail, stored.format)
        if not suspicious:
            return stored
        data = await self.read(key)
        clean = await self.without_metadata(dataclasses.replace(stored, data=data, size=len(data)))
        if clean.data is not data:
            assert clean.data is not None
            await self.write(key, clean.data)
        return dataclasses.replace(clean, data=None, head=b"")


def _total_size(content_range: str | None, length: int) -> int:
    """The whole object's size from a ranged GET's ``Content-Range: bytes 0-99/1234``; without
    one (a store that sent the whole object), its ``length``."""
    if content_range:
        total = content_range.rpartition("/")[2].strip()
        if total.isdigit():
            return int(total)
    return length


def _said(what: str, status: int, code: str) -> Exception | None:
    """An object store's refusal the way the API says it (no such object, full, failed), or
    None for any other."""
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return FileNotFoundError(what)
    if code in ("EntityTooLarge", "QuotaExceeded", "InsufficientStorage") or status == 507:
        return InsufficientStorage(f"the object store is full ({code or status}): {what}")
    if status >= 500:
        return Unavailable(f"the object store failed ({code or status}); try again shortly")
    return None


def _status(e: ClientError) -> int:
    try:
        return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    except (TypeError, ValueError):
        return 0
