"""Past one machine, against the real engines the tests start (tests/engines.py): PostgreSQL
as the datastore, SeaweedFS's S3 server as the image store, two servers as one system.

Every test starts real servers and workers as processes (harness/localsys.py) and talks HTTP
to them; results are compared pixel for pixel with what the filter gives locally."""

from __future__ import annotations

import io
import signal
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from admin import certs
from filtering import registry
from tests.engines import SeaweedS3, _session_engine
from tests.helpers import (
    ADMIN_PASSWORD,
    LocalSystem,
    completed_with,
    frame_png,
    ref,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)


def expected_pixels(original: bytes, filter_name: str) -> bytes:
    with Image.open(io.BytesIO(original)) as im:
        im.load()
        return registry.spec(filter_name).apply(im, {}).tobytes()


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        return im.tobytes()


def cluster_server(tmp: Path, name: str, database: str, store: str, s3, *extra: str) -> LocalSystem:
    return LocalSystem(tmp / name / "data", log_dir=tmp / name / "logs", admin_password=ADMIN_PASSWORD,
                       server_args=("--database", database, "--image-store", store, "--server-name", name, *extra),
                       server_env=s3.env())


def download(system: LocalSystem, token: str, wid: str, image_id: int, type_: str = "filtered") -> ref.Response:
    return ref.request(system.url, "GET", f"/images/{image_id}?workload_id={wid}&type={type_}",
                       headers=ref.bearer(token))


def new_workload(system: LocalSystem, token: str, filter_name: str) -> str:
    r = ref.request(system.url, "POST", "/workloads", f"filter={filter_name}".encode(),
                    {**ref.bearer(token), "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 200, r.body
    return r.json()["workload_id"]


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def bucket_keys(s3, bucket: str, prefix: str = "") -> list[str]:
    import asyncio

    from aiobotocore.session import get_session

    async def keys() -> list[str]:
        async with get_session().create_client(
                "s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                aws_secret_access_key=s3.secret_key, region_name=s3.region) as client:
            out: list[str] = []
            async for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                out += [o["Key"] for o in page.get("Contents", [])]
            return sorted(out)

    return asyncio.run(keys())


def test_quota_delete_and_retention_on_postgresql_and_s3(tmp_path, postgres, s3):
    """The user's own data past one machine: ten uploads at once against a quota on PostgreSQL
    (the owner's row locked: exactly those that fit are taken); a delete removes the workload's
    objects from the bucket; retention removes an old completed workload and its objects, and
    keeps a young completed one."""
    database, bucket = postgres.new_database("owndata"), s3.new_bucket_name("owndata")
    image = frame_png(1, 64, 64)
    quota = int(3.5 * len(image))  # three originals fit, a fourth does not
    a = cluster_server(tmp_path, "a", database, f"s3://{bucket}", s3, "--quota-bytes", str(quota),
                       "--retain-days", str(8 / 86400))
    with a:  # its logs are printed if this fails
        a.start_server()
        token = a.login()
        full = new_workload(a, token, "grayscale")  # no worker yet: no result takes quota meanwhile
        with ThreadPoolExecutor(10) as pool:
            statuses = sorted(pool.map(lambda i: ref.upload(a.url, token, full, f"{i}.png", image).status, range(10)))
        assert statuses == [200] * 3 + [413] * 7
        assert len(a.get(f"/workloads/{full}", token)["filtered_images"]) == 0
        assert ref.request(a.url, "DELETE", f"/workloads/{full}", headers=ref.bearer(token)).status == 200
        wait_until(lambda: not bucket_keys(s3, bucket), 30, "the deleted workload's objects to leave the bucket")

        a.start_worker("w")
        old = new_workload(a, token, "grayscale")
        assert ref.upload(a.url, token, old, "0.png", image).status == 200
        created = time.time()
        wait_until(lambda: completed_with(a, token, old, 1), 60, "the old workload to complete")
        old_keys = bucket_keys(s3, bucket)
        assert len(old_keys) >= 2, old_keys  # its original and its result
        wait_until(lambda: time.time() - created >= 4, 10, "the first workload to be 4 s old")
        young = new_workload(a, token, "grayscale")
        assert ref.upload(a.url, token, young, "0.png", image).status == 200
        wait_until(lambda: completed_with(a, token, young, 1), 60, "the young workload to complete")
        wait_until(lambda: ref.request(a.url, "GET", f"/workloads/{old}", headers=ref.bearer(token)).status == 404,
                   60, "retention to remove the old workload")
        assert a.get(f"/workloads/{young}", token)["filtered_images"] == [0], "a young completed one is kept"
        wait_until(lambda: not set(old_keys) & set(bucket_keys(s3, bucket)), 30, "the old objects to go")
        assert len(bucket_keys(s3, bucket)) >= 2, "the young workload's objects stay"


def test_the_whole_flow_on_postgresql_and_s3(tmp_path, postgres, s3):
    """Small images (inline), larger ones (the worker reads and writes the bucket through
    presigned URLs), thumbnails: all exact, all in the bucket, nothing on the server's disk;
    a second server on the same database takes the first's token and redirects downloads."""
    database, bucket = postgres.new_database("flow"), s3.new_bucket_name("flow")
    store = f"s3://{bucket}/photos"
    a = cluster_server(tmp_path, "a", database, store, s3)
    b = cluster_server(tmp_path, "b", database, store, s3, "--redirect-downloads")
    with a, b:  # its logs are printed if this fails
        a.start_server()
        token = a.start_workers({"w1": (), "w2": ()})
        originals = [frame_png(i, 64, 64) for i in range(4)] + [frame_png(i, 480, 360) for i in range(2)]
        assert all(len(o) > 256 * 1024 for o in originals[4:]), "big enough to bypass the inline path"
        results = {}
        for filter_name in ("grayscale", "blur"):
            wid = new_workload(a, token, filter_name)
            for i, data in enumerate(originals):
                r = ref.upload(a.url, token, wid, f"{i}.png", data)
                assert r.status == 200, r.body
            wait_until(lambda: completed_with(a, token, wid, len(originals)), 90, f"{filter_name} to complete")
            view = a.get(f"/workloads/{wid}", token)
            assert view["filtered_images"] == list(range(len(originals))) and view["failed_images"] == []
            for i, data in enumerate(originals):
                r = download(a, token, wid, i)
                assert r.status == 200 and r.headers["content-type"] == "image/png"
                assert pixels(r.body) == expected_pixels(data, filter_name), f"{filter_name} image {i}"
            results[filter_name] = wid
        jobs = a.get(f"/workloads/{results['blur']}/jobs", token)
        assert all(j["state"] == "done" and j["attempts"] == 1 for j in jobs)

        r = ref.request(a.url, "GET", f"/images/4?workload_id={results['blur']}&size=small",
                        headers=ref.bearer(token))
        assert r.status == 200
        with Image.open(io.BytesIO(r.body)) as im:
            assert max(im.size) == 100

        keys = bucket_keys(s3, bucket)
        assert all(k.startswith("photos/") for k in keys)
        assert sum("/original/" in k for k in keys) == sum("/filtered/" in k for k in keys) == 2 * len(originals)
        assert any("/thumbs/" in k for k in keys), "the thumbnail lives in the bucket too"
        assert files_under(a.data_dir) == ["join-token"], "no image byte on the server's disk (a copy of the join token)"

        # a pipeline that changes the format: the workers put JPEGs in the bucket (presigned for
        # the format the pipeline makes), inline or directly, and the server judges them so
        wid = new_workload(a, token, "resize(width=200)|format(type=jpeg,quality=80)")
        for i, data in enumerate(originals[3:]):
            assert ref.upload(a.url, token, wid, f"{i}.png", data).status == 200
        wait_until(lambda: completed_with(a, token, wid, 3), 90, "the pipeline to complete")
        assert a.get(f"/workloads/{wid}", token)["failed_images"] == []
        for i, data in enumerate(originals[3:]):
            r = download(a, token, wid, i)
            assert r.status == 200 and r.headers["content-type"] == "image/jpeg", i
            with Image.open(io.BytesIO(r.body)) as got, Image.open(io.BytesIO(data)) as src:
                assert got.format == "JPEG" and got.width == 200 and got.height == round(src.height * 200 / src.width)
        jpegs = [k for k in bucket_keys(s3, bucket) if "/filtered/" in k and k.endswith(".jpg")]
        assert sorted(k.rsplit("/", 1)[1] for k in jpegs) == ["0.jpg", "1.jpg", "2.jpg"]

        b.start_server()  # same database: the same users, secret and token
        wid = results["grayscale"]
        r = download(b, token, wid, 5)
        assert r.status == 307, r.status
        with urllib.request.urlopen(r.headers["location"], timeout=10) as got:  # what curl -L does
            assert pixels(got.read()) == expected_pixels(originals[5], "grayscale")
        servers = {s["name"]: s for s in b.get("/status", token)["servers"]}
        assert servers["a"]["leader"] and servers["a"]["alive"] and not servers["b"]["leader"]
        assert files_under(b.data_dir) == ["join-token"]
        # a logout on one server revokes the token on every one
        assert ref.request(b.url, "DELETE", "/logout", headers=ref.bearer(token)).status == 200
        wait_until(lambda: ref.request(a.url, "GET", "/status", headers=ref.bearer(token)).status == 401, 10,
                   "the other server to refuse the revoked token")


def test_a_standby_takes_over_when_the_leader_is_killed(tmp_path, postgres, s3):
    """kill -9 of the scheduling server mid-workload: uploads go on through the other server
    with the same token, the standby takes the lease, requeues what was in flight, and every
    image ends filtered once and exactly; the old leader comes back as a standby."""
    database, bucket = postgres.new_database("failover"), s3.new_bucket_name("failover")
    store = f"s3://{bucket}"
    a = cluster_server(tmp_path, "a", database, store, s3)
    b = cluster_server(tmp_path, "b", database, store, s3)
    with a, b:  # its logs are printed if this fails
        a.start_server()
        b.start_server()
        both = f"{a.controller},{b.controller}"
        slow = ("--controller", both, "--capacity", "2", "--slow-rate", "1", "--slow-ms", "150")
        a.start_worker("w1", *slow)
        a.start_worker("w2", *slow)
        token = a.login()
        a.wait_workers({"w1", "w2"}, token)
        b.wait_workers({"w1", "w2"}, token)  # the standby tracks them too: no rejoin needed
        originals = [frame_png(i, 64, 64) for i in range(40)] + [frame_png(i, 480, 360) for i in range(4)]
        wid = ref.create_workload(a.url, token)["workload_id"]
        for i, data in enumerate(originals[:20]):
            assert ref.upload(a.url, token, wid, f"{i}.png", data).status == 200
        wait_until(lambda: a.get(f"/workloads/{wid}", token)["running_jobs"] > 0, 30, "jobs in flight")
        a.server.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        a.server.wait()
        for i, data in enumerate(originals[20:], 20):
            r = ref.upload(b.url, token, wid, f"{i}.png", data)
            assert r.status == 200, r.body
        wait_until(lambda: b.get("/status", token)["scheduler"]["leader"], 30, "the standby to lead")
        print(f"takeover {time.monotonic() - killed:.2f} s after the kill")
        wait_until(lambda: completed_with(b, token, wid, len(originals)), 120, "the workload to complete")
        view = b.get(f"/workloads/{wid}", token)
        assert view["filtered_images"] == list(range(len(originals))) and view["failed_images"] == []
        for i, data in enumerate(originals):
            r = download(b, token, wid, i)
            assert r.status == 200 and pixels(r.body) == expected_pixels(data, "grayscale"), i
        images = ref.request(b.url, "GET", f"/images?workload_id={wid}", headers=ref.bearer(token)).json()
        assert sorted((i["type"], i["image_id"]) for i in images) == sorted(
            [("original", k) for k in range(len(originals))] + [("filtered", k) for k in range(len(originals))])
        keys = bucket_keys(s3, bucket)
        assert len(keys) == 2 * len(originals), "stored once each"

        a.start_server()  # back, as a standby
        servers = lambda: {s["name"]: s for s in a.get("/status", token)["servers"]}  # noqa: E731
        wait_until(lambda: servers()["a"]["alive"] and servers()["b"]["leader"], 30, "a back as a standby")
        assert not a.get("/status", token)["scheduler"]["leader"]


def test_outages_of_the_stores_are_503s_and_heal(tmp_path, postgres, s3):
    """The object store down: uploads are a 503 that says so, nothing accepted is lost, and
    they work again once it is back. The database down: a 503 too, then everything works."""
    database, bucket = postgres.new_database("outage"), s3.new_bucket_name("outage")
    system = cluster_server(tmp_path, "a", database, f"s3://{bucket}", s3)
    with system:  # its logs are printed if this fails
        system.start_server()
        token = system.start_workers({"w1": ()})
        wid = ref.create_workload(system.url, token)["workload_id"]
        assert ref.upload(system.url, token, wid, "0.png", frame_png(0, 64, 64)).status == 200

        s3.stop()
        try:
            r = ref.upload(system.url, token, wid, "1.png", frame_png(1, 64, 64))
            assert r.status == 503 and "object store" in r.json()["error"], (r.status, r.body)
        finally:
            s3.start()
        wait_until(lambda: ref.upload(system.url, token, wid, "1.png", frame_png(1, 64, 64)).status == 200,
                   60, "uploads to work again")

        postgres.stop()
        try:
            r = ref.request(system.url, "GET", f"/workloads/{wid}", headers=ref.bearer(token))
            assert r.status == 503 and "database" in r.json()["error"], (r.status, r.body)
        finally:
            postgres.start()
        wait_until(lambda: ref.request(system.url, "GET", f"/workloads/{wid}",
                                       headers=ref.bearer(token)).status == 200, 60, "the database to answer")
        assert ref.upload(system.url, token, wid, "2.png", frame_png(2, 64, 64)).status == 200
        wait_until(lambda: completed_with(system, token, wid, 3), 90, "every accepted image to be filtered")
        assert system.get(f"/workloads/{wid}", token)["filtered_images"] == [0, 1, 2]


@pytest.fixture(scope="module")
def s3_tls() -> Iterator[SeaweedS3]:
    """Another S3 server, serving HTTPS with a certificate of its own CA."""
    yield from _session_engine(lambda: SeaweedS3(tls=True), "SeaweedFS S3 over TLS")


def test_postgresql_and_s3_over_tls_behind_a_server_over_tls(tmp_path, postgres, s3_tls, monkeypatch):
    """Every connection encrypted: the datastore URL asks for TLS with the cluster's certificate
    checked (``sslmode=verify-full&sslrootcert=CA``), the object store is https:// trusted through
    ``AWS_CA_BUNDLE`` (by the server and by the workers, which read and write big images in it
    through presigned URLs), and the server serves HTTPS and mutual TLS to its workers."""
    name = postgres.new_database("tls_flow").rsplit("/", 1)[1]
    bucket = s3_tls.new_bucket_name("tls")
    system = LocalSystem(tmp_path / "data", log_dir=tmp_path / "logs", admin_password=ADMIN_PASSWORD,
                         tls_dir=tmp_path / "tls", server_env=s3_tls.env(),
                         server_args=("--database", postgres.tls_url_of(name), "--image-store", f"s3://{bucket}"))
    monkeypatch.setenv("DPIP_CA_FILE", system.ca_file)
    monkeypatch.setenv("AWS_CA_BUNDLE", s3_tls.ca_file)
    assert s3_tls.endpoint.startswith("https://")
    with system:
        system.start_server()
        system.start_worker("w1", env={"AWS_CA_BUNDLE": s3_tls.ca_file})
        token = system.login()
        system.wait_workers({"w1"}, token)
        wid = new_workload(system, token, "grayscale")
        originals = [frame_png(i, 64, 64) for i in range(3)] + [frame_png(7, 480, 360)]
        assert len(originals[-1]) > 256 * 1024, "big enough for the worker to use the bucket itself"
        for i, data in enumerate(originals):
            assert ref.upload(system.url, token, wid, f"{i}.png", data).status == 200
        wait_until(lambda: completed_with(system, token, wid, len(originals)), 90, "the workload to complete")
        for i, data in enumerate(originals):
            assert pixels(download(system, token, wid, i).body) == expected_pixels(data, "grayscale")
        rows = postgres.psql(f"SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a"
                             f" USING (pid) WHERE a.datname = '{name}'")
        count, all_tls = rows.split("|")
        assert int(count) >= 1 and all_tls.strip() == "t", rows
        keys = bucket_keys(s3_tls, bucket)
        assert sum("/filtered/" in k for k in keys) == len(originals), keys
    # A CA that did not sign the cluster's certificate: the server refuses to start on it.
    other = tmp_path / "other"
    certs.init(other, ["127.0.0.1"])
    wrong = postgres.tls_url_of(name).replace(postgres.ca_file, str(other / "ca.pem"))
    refused = LocalSystem(tmp_path / "data2", log_dir=tmp_path / "logs2", server_args=("--database", wrong))
    proc = refused.start_server(wait=False)
    try:
        assert proc.wait(60) != 0
    finally:
        refused.stop()
    assert "certificate verify failed" in (tmp_path / "logs2" / "server.log").read_text()


def test_a_sole_copys_result_skips_the_check_and_a_second_copy_never_replaces_the_first(
        tmp_path, postgres, s3, monkeypatch):
    """On PostgreSQL + S3 (objects are written whole, replacing): the only copy of a first attempt
    stores its result without asking the datastore first; a second copy's result (another
    worker's bytes) is then refused as a duplicate by the datastore's word and never replaces the
    first one's object."""
    import asyncio

    from common.models import Filter
    from controller.jobs import JobLifecycle, Timing
    from storage.postgres import PostgresDatastore
    from storage.s3 import S3ImageStore

    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)

    async def run() -> None:
        store = PostgresDatastore(postgres.new_database(f"sole_{tmp_path.name}"))
        images = S3ImageStore(f"s3://{s3.new_bucket_name('sole')}", 10**7, 10**8)
        await store.open()
        await images.open()
        try:
            jobs = JobLifecycle(store, images)
            w = await store.create_workload("w", "alice", Filter.GRAYSCALE, ())
            original = frame_png(1, 32, 32)
            job = await jobs.accept_original(w, await images.receive_bytes(original), None)
            job = jobs.as_dispatched(job)
            first = registry_png(original, "grayscale", 1)
            second = registry_png(original, "grayscale", 9)
            assert first != second
            asked: list[str] = []
            real = store.has_image

            async def counted(*args):
                asked.append("has_image")
                return await real(*args)

            store.has_image = counted  # type: ignore[method-assign]
            await jobs.store_inline_result(job, first, Timing("w1", 1, 1, 1), lambda: True)
            assert asked == [], "the sole copy's result did not ask whether another was recorded"
            await jobs.store_inline_result(job, second, Timing("w2", 1, 1, 1), lambda: False)
            assert asked == ["has_image"]
            key = f"{w.dir}/filtered/{job.image_id}.png"
            assert await images.read(key) == first, "the second copy's bytes never replaced the first's"
            assert (await store.view_of(w.id)).filtered_images == [job.image_id]
        finally:
            await images.close()
            await store.close()

    asyncio.run(run())


def registry_png(original: bytes, filter_name: str, level: int) -> bytes:
    """``original`` filtered, as a PNG of zlib ``level`` (two workers' encodings of one result)."""
    with Image.open(io.BytesIO(original)) as im:
        im.load()
        out = io.BytesIO()
        registry.spec(filter_name).apply(im, {}).save(out, "PNG", compress_level=level)
        return out.getvalue()
