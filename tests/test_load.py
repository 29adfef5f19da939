"""50 concurrent clients, 10 users, each client uploading to its own workload for 20 seconds:
no 5xx, every accepted image filtered, and no image in anyone else's workload."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import time

import aiohttp
from PIL import Image, ImageDraw

from controller.auth import hash_password
from storage.sqlite import SqliteDatastore
from tests.helpers import ADMIN_PASSWORD, LocalSystem, until

CLIENTS, USERS, SECONDS, PERIOD = 50, 10, 20.0, 1.0


def tagged_png(client: int, seq: int) -> bytes:
    """A small image that says whose it is and which one."""
    im = Image.new("RGB", (48, 32), (client * 5 % 256, seq * 7 % 256, 90))
    ImageDraw.Draw(im).text((2, 2), f"{client}:{seq}", fill=(255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


async def add_users(system: LocalSystem) -> None:
    system.data_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteDatastore(system.data_dir / "dpip.sqlite3")
    await store.open()
    try:
        await store.add_user("admin", hash_password(ADMIN_PASSWORD))  # no first-start admin now
        h = hash_password("load-test-pw")
        for u in range(USERS):
            await store.add_user(f"user{u}", h)
    finally:
        await store.close()


async def client_run(http: aiohttp.ClientSession, url: str, n: int, statuses: list[int]) -> tuple[str, dict[int, bytes]]:
    cred = base64.b64encode(f"user{n % USERS}:load-test-pw".encode()).decode()
    async with http.get(f"{url}/login", headers={"Authorization": f"Basic {cred}"}) as r:
        http.headers["Authorization"] = f"Bearer {(await r.json())['token']}"
    async with http.post(f"{url}/workloads", data={"workload_name": f"client-{n}"}) as r:
        wid = (await r.json())["workload_id"]
    accepted: dict[int, bytes] = {}
    deadline = time.monotonic() + SECONDS
    seq = 0
    while time.monotonic() < deadline:
        data = tagged_png(n, seq)
        form = aiohttp.FormData({"workload_id": wid})
        form.add_field("data", data, filename=f"{seq}.png")
        async with http.post(f"{url}/images", data=form) as r:
            statuses.append(r.status)
            if r.status == 200:
                accepted[(await r.json())["image_id"]] = data
        seq += 1
        await asyncio.sleep(PERIOD)  # the load itself: one upload a second per client, no sync
    return wid, accepted


async def test_fifty_concurrent_clients_for_twenty_seconds(tmp_path):
    system = LocalSystem(tmp_path / "data", log_dir=tmp_path / "logs", admin_password=ADMIN_PASSWORD)
    await add_users(system)
    try:
        await asyncio.to_thread(system.start_server)
        system.start_worker("a")
        system.start_worker("b")
        await asyncio.to_thread(system.wait_workers, {"a", "b"})
        statuses: list[int] = []
        async with contextlib.AsyncExitStack() as sessions:  # every session closed, on every path
            https = [await sessions.enter_async_context(aiohttp.ClientSession()) for _ in range(CLIENTS)]
            async with asyncio.TaskGroup() as clients:  # one failing cancels the others
                tasks = [clients.create_task(client_run(https[n], system.url, n, statuses)) for n in range(CLIENTS)]
            runs = [t.result() for t in tasks]
            assert statuses and all(s < 500 for s in statuses), sorted(set(statuses))
            total = sum(len(acc) for _, acc in runs)
            assert total >= CLIENTS * 10, f"only {total} uploads accepted"
            for n, ((wid, accepted), http) in enumerate(zip(runs, https)):

                async def completed(http=http, wid=wid):
                    async with http.get(f"{system.url}/workloads/{wid}") as r:
                        view = await r.json()
                    return view if view["status"] == "completed" else None

                view = await until(completed, 120, f"client {n}'s workload to complete")
                assert view["filtered_images"] == sorted(accepted) and view["failed_images"] == []
                async with http.get(f"{system.url}/images", params={"workload_id": wid, "type": "original"}) as r:
                    assert [x["image_id"] for x in await r.json()] == sorted(accepted)
                for i, data in accepted.items():  # every original is this client's own bytes
                    async with http.get(f"{system.url}/images/{i}", params={"workload_id": wid}) as r:
                        assert await r.read() == data, f"client {n} image {i} is not its own"
    except BaseException:
        print(system.logs())
        raise
    finally:
        await asyncio.to_thread(system.stop)
