"""What the reference's own clients send, byte for byte where it matters.

Deliberately not aiohttp: plain http.client, a GET for login, a bare POST for workloads, a
hand-built multipart upload whose file part has no Content-Type, and a GET with a form body.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import uuid
from urllib.parse import urlencode, urlsplit


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> Response:
    u = urlsplit(url)
    conn: http.client.HTTPConnection
    if u.scheme == "https":  # a server with --tls-cert: its CA from DPIP_CA_FILE (as dpip's), else the system's
        context = ssl.create_default_context(cafile=os.environ.get("DPIP_CA_FILE") or None)
        conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=30, context=context)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def login(url: str, user: str, password: str) -> str:
    """curl -u user:password http://.../login (a GET)."""
    cred = base64.b64encode(f"{user}:{password}".encode()).decode()
    r = request(url, "GET", "/login", headers={"Authorization": f"Basic {cred}"})
    assert r.status == 200, r.body
    return r.json()["token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create_workload(url: str, token: str) -> dict:
    """curl -X POST -H "Authorization: Bearer T" http://.../workloads (no body at all)."""
    r = request(url, "POST", "/workloads", headers=bearer(token))
    assert r.status == 200, r.body
    return r.json()


def multipart(fields: dict[str, str], file_field: str, filename: str, data: bytes,
              file_content_type: str | None = None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = bytearray()
    out += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{file_field}\"; filename=\"{filename}\"\r\n".encode()
    if file_content_type:
        out += f"Content-Type: {file_content_type}\r\n".encode()
    out += b"\r\n" + data + b"\r\n"
    for k, v in fields.items():
        out += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def upload(url: str, token: str, workload_id: str, filename: str, data: bytes,
           with_type: bool = True) -> Response:
    """The stress client: file first in field 'data', no part Content-Type, then the fields."""
    fields = {"workload_id": workload_id}
    if with_type:
        fields["type"] = "original"
    body, ctype = multipart(fields, "data", filename, data)
    return request(url, "POST", "/images", body, {**bearer(token), "Content-Type": ctype})


def pull(url: str, token: str, workload_id: str, image_id: int, type_: str = "filtered") -> Response:
    """The pull client: GET /images/{id} with workload_id and type as a form-encoded body."""
    body = urlencode({"workload_id": workload_id, "type": type_}).encode()
    return request(url, "GET", f"/images/{image_id}", body,
                   {**bearer(token), "Content-Type": "application/x-www-form-urlencoded"})


def get_json(url: str, token: str, path: str) -> dict:
    r = request(url, "GET", path, headers=bearer(token))
    assert r.status == 200, r.body
    return r.json()
