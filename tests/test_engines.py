"""The real engines the tests start themselves: PostgreSQL and SeaweedFS's S3, outages included."""

from __future__ import annotations

import asyncio
import gc
import re
import warnings

import aiohttp
import asyncpg
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

# Presigned URLs must be SigV4: botocore's default for us-east-1 is SigV2, which signs the
# Content-Type too, so a plain PUT of the URL would be refused.
SIGV4 = AioConfig(signature_version="s3v4")


async def connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=30)


async def test_postgres_serves_the_dpip_role_and_database(postgres):
    assert re.fullmatch(rf"postgresql://dpip:\w+@127\.0\.0\.1:{postgres.port}/dpip", postgres.url)
    conn = await connect(postgres.url)
    try:
        assert await conn.fetchval("SELECT current_user || '@' || current_database()") == "dpip@dpip"
        await conn.execute("CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, body text)")
        await conn.execute("INSERT INTO notes (body) VALUES ($1)", "hello")
        assert "hello" in [r["body"] for r in await conn.fetch("SELECT body FROM notes")]
    finally:
        await conn.close()


async def test_postgres_checks_the_password(postgres):
    with pytest.raises(asyncpg.InvalidPasswordError):
        await connect(postgres.url.replace(postgres.password, "wrong"))


async def test_new_database_is_empty_owned_by_dpip_and_sanitized(postgres):
    url = postgres.new_database("test_x[Café-1]")
    again = postgres.new_database("test_x[Café-1]")
    name = url.rsplit("/", 1)[1]
    assert re.fullmatch(r"test_x_caf_1_\d+", name) and again != url
    conn = await connect(url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        assert await conn.fetchval("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1",
                                   name) == "dpip"
        await conn.execute("CREATE TABLE mine (x int)")  # the owner may create in public
    finally:
        await conn.close()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_outage_and_recovery_keep_committed_rows(postgres, mode):
    url = postgres.new_database(f"outage_{mode}")
    conn = await connect(url)
    await conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)")
    await asyncio.to_thread(postgres.stop, mode)
    await asyncio.to_thread(postgres.stop, mode)  # stopping a stopped cluster is a no-op
    try:
        # A connect that fails as the server goes may leave its socket to the garbage collector
        # (asyncio's create_connection, refused mid-connect): collected here, its ResourceWarning
        # expected, not raised later inside another test.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                await conn.fetchval("SELECT count(*) FROM t")
            with pytest.raises(OSError):
                await connect(url)
            gc.collect()
    finally:
        await conn.close()
        await asyncio.to_thread(postgres.start)
    conn = await connect(url)
    try:
        assert await conn.fetchval("SELECT sum(x) FROM t") == 3
    finally:
        await conn.close()


@pytest.fixture
async def client(s3):
    async with get_session().create_client("s3", config=SIGV4, **s3.client_kwargs()) as c:
        yield c


@pytest.fixture
async def bucket(s3, client, request):
    name = s3.new_bucket_name(request.node.name)
    await client.create_bucket(Bucket=name)
    return name


async def body_of(client, bucket: str, key: str) -> bytes:
    r = await client.get_object(Bucket=bucket, Key=key)
    async with r["Body"] as stream:
        return await stream.read()


async def test_bucket_names_are_valid_and_unique(s3):
    names = {s3.new_bucket_name("Some_Test[param-1].x" * 5) for _ in range(3)} | {s3.new_bucket_name("")}
    assert len(names) == 4
    for name in names:
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", name), name


async def test_s3_put_get_list(s3, client, bucket):
    await client.put_object(Bucket=bucket, Key="a/b.png", Body=b"\x89PNG bytes")
    assert await body_of(client, bucket, "a/b.png") == b"\x89PNG bytes"
    listed = await client.list_objects_v2(Bucket=bucket, Prefix="a/")
    assert [o["Key"] for o in listed["Contents"]] == ["a/b.png"]
    assert bucket in [b["Name"] for b in (await client.list_buckets())["Buckets"]]


async def test_presigned_urls_work_without_credentials(s3, client, bucket):
    await client.put_object(Bucket=bucket, Key="get-me", Body=b"presigned bytes")
    get_url = await client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "get-me"},
                                                  ExpiresIn=300)
    put_url = await client.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "put-me"},
                                                  ExpiresIn=300)
    assert get_url.startswith(s3.endpoint) and "X-Amz-Signature=" in get_url
    async with aiohttp.ClientSession() as http:
        async with http.get(get_url) as r:
            assert r.status == 200 and await r.read() == b"presigned bytes"
        async with http.put(put_url, data=b"uploaded by url") as r:
            assert r.status == 200, await r.text()
    assert await body_of(client, bucket, "put-me") == b"uploaded by url"


async def test_unsigned_and_badly_signed_requests_are_refused(s3, client, bucket):
    await client.put_object(Bucket=bucket, Key="secret", Body=b"private")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{s3.endpoint}/{bucket}/secret") as r:
            assert r.status == 403 and b"private" not in await r.read()
        async with http.put(f"{s3.endpoint}/{bucket}/anon", data=b"x") as r:
            assert r.status == 403
        async with http.get(f"{s3.endpoint}/") as r:
            assert r.status == 403
    wrong = dict(s3.client_kwargs(), aws_secret_access_key="not-the-secret")
    async with get_session().create_client("s3", config=SIGV4, **wrong) as bad:
        with pytest.raises(ClientError) as e:
            await bad.get_object(Bucket=bucket, Key="secret")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as e:
        await client.head_object(Bucket=bucket, Key="anon")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


async def test_env_points_an_sdk_at_the_server(s3, bucket, monkeypatch):
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    async with get_session().create_client("s3") as c:
        assert bucket in [b["Name"] for b in (await c.list_buckets())["Buckets"]]


async def test_s3_outage_and_recovery_keep_objects(s3, client, bucket):
    await client.put_object(Bucket=bucket, Key="kept", Body=b"survives an outage")
    await asyncio.to_thread(s3.stop)
    try:
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientConnectionError):
                async with http.get(f"{s3.endpoint}/"):
                    pass
    finally:
        await asyncio.to_thread(s3.start)
    # The same client carries on: its pooled connections to the dead server are replaced.
    assert await body_of(client, bucket, "kept") == b"survives an outage"
    await client.put_object(Bucket=bucket, Key="after", Body=b"written after")
    assert await body_of(client, bucket, "after") == b"written after"


async def test_a_result_a_worker_put_in_the_bucket_is_stripped_of_its_metadata(s3, bucket, monkeypatch):
    """A worker writes results to the object store itself: one with EXIF (a GPS position) and a
    text chunk, small or past the first 256 KiB the server judges, is rewritten without them;
    an honest one is left as it is."""
    import io
    import os

    from PIL import Image

    from storage.s3 import S3ImageStore
    from tests.fakeworker import with_metadata

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    store = S3ImageStore(f"s3://{bucket}", 32 << 20, 50_000_000)
    await store.open()
    try:
        small = io.BytesIO()
        Image.new("L", (64, 48), 90).save(small, "PNG")
        big = io.BytesIO()  # incompressible: its text chunks come after 256 KiB of pixels
        Image.frombytes("L", (600, 600), os.urandom(360_000)).save(big, "PNG", compress_level=0)
        for name, honest in (("small", small.getvalue()), ("big", big.getvalue())):
            for key, data in ((f"{name}-clean.png", honest), (f"{name}-dirty.png", with_metadata(honest)),
                              (f"{name}-dirty-at-the-end.png", _text_before_iend(honest))):
                await store.write(key, data)
                stored = await store.stored_result(key)
                assert stored is not None
                cleaned = await store.clean_stored_result(key, stored)
                kept = await store.read(key)
                if key.endswith("clean.png"):
                    assert kept == honest and cleaned.size == len(honest)
                else:
                    assert b"eXIf" not in kept and b"tEXt" not in kept and cleaned.size == len(kept)
                    with Image.open(io.BytesIO(kept)) as im, Image.open(io.BytesIO(honest)) as src:
                        assert im.tobytes() == src.tobytes() and dict(im.getexif()) == {}
        # Judged in one ranged GET: its whole size from its Content-Range, nothing for an empty
        # object, a missing one or one past the upload limit.
        stored = await store.stored_result("big-clean.png")
        assert stored is not None and stored.size == len(big.getvalue()) > 256 * 1024
        await store.write("empty.png", b"")
        assert await store.stored_result("empty.png") is None
        assert await store.stored_result("never-written.png") is None
        tight = S3ImageStore(f"s3://{bucket}", len(big.getvalue()) - 1, 50_000_000)
        await tight.open()
        try:
            assert await tight.stored_result("big-clean.png") is None
        finally:
            await tight.close()
    finally:
        await store.close()


def _text_before_iend(png: bytes) -> bytes:
    """A text chunk after the pixels (where the first 256 KiB do not reach in a large file)."""
    import struct
    import zlib

    body = b"tEXt" + b"Comment\x00taken at the made-up place"
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return png[:-12] + chunk + png[-12:]
