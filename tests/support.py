"""What several test modules share without importing one another (or conftest): the admin
password the fixtures start systems with, test images, and the in-process API client's calls."""

from __future__ import annotations

import base64
import io

from PIL import Image

from scripts import refclient as ref

ADMIN_PASSWORD = "test-admin-pw"


def png_bytes(width: int = 64, height: int = 48, colour=(200, 100, 50), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


def png(colour: tuple[int, int, int], size=(160, 120)) -> bytes:
    """A plain PNG of one colour (default 160x120)."""
    return png_bytes(size[0], size[1], colour)


# -- the in-process app (aiohttp's test client) ---------------------------------------------

def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(client, user="admin", password=ADMIN_PASSWORD) -> str:
    r = await client.get("/login", headers=basic(user, password))
    assert r.status == 200
    return (await r.json())["token"]


async def new_workload(client, token, **params) -> dict:
    r = await client.post("/workloads", headers=bearer(token), data=params or None)
    assert r.status == 200, await r.text()
    return await r.json()


async def upload(client, token, workload_id, data, type_="original", field="data", extra=None):
    body, ctype = ref.multipart({"workload_id": workload_id, "type": type_, **(extra or {})},
                                field, "17.png", data)
    return await client.post("/images", data=body, headers={**bearer(token), "Content-Type": ctype})


async def assert_error(r, status: int, *words: str) -> dict:
    assert r.status == status, (r.status, await r.text())
    assert r.content_type == "application/json"
    body = await r.json()
    assert set(body) == {"error"} and body["error"]
    for w in words:
        assert w in body["error"], body
    return body
