"""A job's bytes over HTTP: the original from the API (with the job's capability) or from its
presigned URL in the object store, the result to the API or to its presigned URL. Every failure
is a :class:`JobFailed` saying whether another attempt may help and whether the store, not the
job, was at fault."""

from __future__ import annotations

import aiohttp

from imaging.formats import FORMATS
from plane import wire


class JobFailed(Exception):
    def __init__(self, message: str, retryable: bool = True, transient: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.transient = transient  # where the images live could not be reached (not the job's fault)


class Transfers:
    """The worker's HTTP client for images, and the operator's --image-store-token (which wins
    over a job's capability)."""

    def __init__(self, http: aiohttp.ClientSession, token_override: str = "") -> None:
        self.http = http
        self.token_override = token_override

    async def close(self) -> None:
        await self.http.close()

    def auth(self, msg: wire.RunJob) -> dict[str, str]:
        """The job's own capability (or the operator's --image-store-token, which wins)."""
        return {"Authorization": f"Bearer {self.token_override or msg.capability}"}

    async def fetch(self, url: str) -> bytes:
        """An original from its presigned URL."""
        try:
            async with self.http.get(url) as r:
                if r.status != 200:
                    raise JobFailed(f"download from the image store failed: HTTP {r.status}",
                                    retryable=r.status >= 500 or r.status == 403, transient=r.status >= 500)
                return await r.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise JobFailed(f"download from the image store failed: {e!r}", transient=True) from e

    async def put(self, url: str, data: bytes, fmt: str) -> None:
        """A result to its presigned URL."""
        try:
            async with self.http.put(url, data=data) as r:
                if r.status not in (200, 201, 204):
                    raise JobFailed(f"upload to the image store failed: HTTP {r.status}",
                                    retryable=r.status >= 500 or r.status == 403, transient=r.status >= 500)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise JobFailed(f"upload to the image store failed: {e!r}", transient=True) from e

    async def download(self, msg: wire.RunJob, api_url: str) -> bytes:
        """The job's original from the API, with the job's capability."""
        url = f"{api_url}/images/{msg.image_id}"
        params = {"workload_id": msg.workload_id, "type": "original"}
        try:
            async with self.http.get(url, params=params, headers=self.auth(msg)) as r:
                if r.status != 200:
                    raise JobFailed(f"download failed: HTTP {r.status}: {(await r.text())[:200]}",
                                    retryable=r.status >= 500 or r.status == 401, transient=r.status == 503)
                return await r.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise JobFailed(f"download failed: {e!r}") from e

    async def upload(self, msg: wire.RunJob, api_url: str, data: bytes, fmt: str) -> None:
        """The job's result to the API (``POST /images``, type filtered), with its capability."""
        ext, ctype = FORMATS.get(fmt, ("bin", "application/octet-stream"))
        form = aiohttp.FormData()
        form.add_field("workload_id", msg.workload_id)
        form.add_field("type", "filtered")
        form.add_field("image_id", str(msg.image_id))
        form.add_field("data", data, filename=f"{msg.image_id}.{ext}", content_type=ctype)
        try:
            async with self.http.post(f"{api_url}/images", data=form, headers=self.auth(msg)) as r:
                if r.status not in (200, 201):
                    raise JobFailed(f"upload failed: HTTP {r.status}: {(await r.text())[:200]}",
                                    retryable=r.status >= 500 or r.status == 401, transient=r.status in (503, 507))
        except (aiohttp.ClientError, TimeoutError) as e:
            raise JobFailed(f"upload failed: {e!r}") from e
