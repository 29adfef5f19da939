"""An asyncio client of the DPIP HTTP API: one method per endpoint, errors as :class:`CliError`."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from typing import Any

import aiohttp

from cli.session import EXIT_AUTH, EXIT_FAILED, EXIT_UNREACHABLE, CliError

#: Statuses worth another try: the server or a proxy in front of it is busy or restarting.
RETRYABLE = {429, 502, 503, 504}


def _trust() -> ssl.SSLContext | bool:
    """What an https:// server's certificate is checked against: ``$DPIP_CA_FILE`` (``--ca-file``)
    if set, else the system's CAs (aiohttp's default). Never unchecked."""
    ca_file = os.environ.get("DPIP_CA_FILE")
    if not ca_file:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise CliError(f"cannot use the CA file {ca_file}: {getattr(e, 'strerror', None) or e}", EXIT_FAILED) from e


class ApiError(CliError):
    """The server answered with an error; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, EXIT_AUTH if status == 401 else EXIT_FAILED)
        self.status = status


class Api:
    """``async with Api(url, token) as api: ...``; ``retries`` covers dropped connections and
    busy answers (the upload endpoint is idempotent for a given ``image_id``). ``token_from``
    says where the token came from, for the message when the server refuses it."""

    def __init__(self, url: str, token: str = "", *, connections: int = 8, retries: int = 3,
                 timeout: float = 120.0, token_from: str = "") -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.token_from = token_from
        self.retries = retries
        self._connections = connections
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=10)
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self._http = aiohttp.ClientSession(
            timeout=self._timeout, connector=aiohttp.TCPConnector(limit=self._connections, ssl=_trust())
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    # -- endpoints ------------------------------------------------------------------------

    async def login(self, user: str, password: str) -> str:
        body = await self._json("POST", "/login", auth=aiohttp.BasicAuth(user, password))
        return body["token"]

    async def logout(self) -> dict:
        return await self._json("DELETE", "/logout")

    async def status(self) -> dict:
        return await self._json("GET", "/status")

    async def filters(self) -> list[dict]:
        return await self._json("GET", "/filters")

    async def workloads(self) -> list[dict]:
        return await self._json("GET", "/workloads")

    async def workload_named(self, name: str) -> dict | None:
        """The caller's workload of that name (names are unique per owner), page by page."""
        after = ""
        while True:
            page = await self._json("GET", f"/workloads?limit=1000{'&after=' + after if after else ''}")
            for w in page:
                if w["workload_name"] == name:
                    return w
            if len(page) < 1000:
                return None
            after = page[-1]["workload_id"]

    async def workload(self, workload_id: str) -> dict:
        return await self._json("GET", f"/workloads/{workload_id}")

    async def create_workload(self, filter: str, name: str | None, tags: str | None,
                              meta: dict | None = None, params: dict | None = None) -> dict:
        body: dict[str, Any] = {"filter": filter, **(params or {})}
        if name:
            body["workload_name"] = name
        if tags:
            body["tags"] = tags
        if meta:
            body["meta"] = meta
        return await self._json("POST", "/workloads", json=body)

    async def delete_workload(self, workload_id: str) -> dict:
        return await self._json("DELETE", f"/workloads/{workload_id}")

    async def list_images(self, workload_id: str, type_: str) -> list[dict]:
        return await self._json("GET", "/images", params={"workload_id": workload_id, "type": type_})

    async def upload(self, workload_id: str, image_id: int, filename: str, data: bytes) -> bool:
        """Upload original ``image_id``; False if the server has these very bytes under that id
        already (a resumed push, or a retry whose first reply was lost)."""

        def form() -> aiohttp.FormData:
            f = aiohttp.FormData()
            f.add_field("workload_id", workload_id)
            f.add_field("type", "original")
            f.add_field("image_id", str(image_id))
            f.add_field("data", data, filename=filename, content_type="application/octet-stream")
            return f

        try:
            await self._json("POST", "/images", data=form)
        except ApiError as e:
            if e.status != 409:
                raise
            if await self.download(workload_id, image_id, "original") != data:
                raise CliError(f"image {image_id} of workload {workload_id} already exists with other"
                               " content: push into a new workload") from e
            return False
        return True

    async def download(self, workload_id: str, image_id: int, type_: str) -> bytes:
        params = {"workload_id": workload_id, "type": type_}
        return await self._request("GET", f"/images/{image_id}", params=params, raw=True)

    # -- plumbing -------------------------------------------------------------------------

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return await self._request(method, path, **kwargs)

    async def _request(self, method: str, path: str, *, raw: bool = False,
                       data: Any = None, **kwargs: Any) -> Any:
        assert self._http is not None, "use `async with Api(...)`"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                body = data() if callable(data) else data  # a FormData is consumed by a send
                async with self._http.request(method, self.url + path, headers=headers,
                                              data=body, **kwargs) as resp:
                    payload = await resp.read()
                    if resp.status < 400:
                        return payload if raw else json.loads(payload)
                    if resp.status not in RETRYABLE or last:
                        message = _error_message(payload, resp.status)
                        if resp.status == 401:
                            message = token_refused(message, bool(self.token), self.token_from)
                        raise ApiError(message, resp.status)
                    delay = float(resp.headers.get("Retry-After", 0) or 0) or 0.5 * 2**attempt
            except aiohttp.ClientConnectorCertificateError as e:
                raise CliError(f"the server at {self.url} shows a certificate we do not trust"
                               f" ({e.certificate_error}): give its CA with --ca-file or DPIP_CA_FILE",
                               EXIT_UNREACHABLE) from e
            except aiohttp.ClientConnectorError as e:
                raise CliError(f"cannot reach the server at {self.url}: {e.os_error or e}",
                               EXIT_UNREACHABLE) from e
            except (TimeoutError, aiohttp.ClientError) as e:
                if last:
                    detail = str(e) or type(e).__name__
                    raise CliError(f"{method} {path} failed: {detail}", EXIT_UNREACHABLE) from e
                delay = 0.5 * 2**attempt
            except ValueError as e:
                raise CliError(f"the server at {self.url} did not answer JSON: is it DPIP?") from e
            await asyncio.sleep(min(delay, 10))
        raise AssertionError("unreachable")


def _error_message(payload: bytes, status: int) -> str:
    try:
        message = json.loads(payload)["error"]
    except (ValueError, KeyError, TypeError):
        message = payload.decode("utf-8", "replace").strip()[:200] or f"HTTP {status}"
    return str(message)


#: What the server's reasons for refusing a token mean to the person holding it.
_REFUSALS = (
    ("expired", "has expired"),
    ("revoked", "was revoked (logged out)"),
    ("no longer exists", "is for a user that no longer exists on this server"),
    ("earlier account", "is from before your account was created again"),
)


def token_refused(server_says: str, had_token: bool, token_from: str = "") -> str:
    """A 401 in plain words, with what to do about it (the server's wording is for curl users)."""
    if not had_token:
        return "not logged in: run `dpip login`"
    text = server_says.lower()
    what = next((plain for key, plain in _REFUSALS if key in text),
                "is not valid on this server (expired, revoked, or from another server)")
    if token_from:
        return f"the token in {token_from} {what}: set a new one, or unset it and run `dpip login`"
    return f"your session {what}: run `dpip login`"

