"""The clients ``make bench`` drives DPIP with: the ways users push images and wait for results.

- ``aiohttp_push``: asyncio uploaders on one ``aiohttp`` session (``make bench``'s own clients).
- ``requests_push``: plain ``requests`` threads, one ``Session`` each, sending the reference's
  multipart form (``refclient.multipart``): what the reference's clients and users' scripts do.
- ``cli_push``: the ``dpip push`` command, as a user types it.
- ``round_trips``: one client, one image at a time: upload, then poll until it is filtered.

Every push is timed from the first upload until ``GET /workloads/{id}`` says completed with all
its images (polled every ``WATCH_INTERVAL``).
"""

from __future__ import annotations

import asyncio
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp
import requests

from harness import refclient as ref
from harness.localsys import clean_env, wait_until

DPIP = str(Path(sys.executable).parent / "dpip")
WATCH_INTERVAL = 0.02  # seconds between two GET /workloads/{id} of a watcher
ROUND_TRIP_POLL = 0.001  # seconds between two polls of the one-at-a-time client
TIMEOUT = 900.0  # no run of the bench takes this long: something is stuck


@dataclass(frozen=True)
class Push:
    """One workload pushed and waited for."""

    workload_id: str
    images: int
    elapsed: float  # seconds, first upload -> workload completed
    polls: int = 0  # GET /workloads/{id} the watcher sent (where counted)

    @property
    def rate(self) -> float:
        return self.images / self.elapsed


def finished(view: dict, images: int) -> bool:
    """Whether a workload view is completed with all ``images``; a failed image is an error."""
    if view["status"] != "completed" or view["images"] != images:
        return False
    assert not view["failed_images"], view["failed_images"]
    return True


# -- aiohttp ------------------------------------------------------------------------------------

async def _aiohttp_push(url: str, token: str, images: list[bytes], clients: int) -> Push:
    async with aiohttp.ClientSession(headers=ref.bearer(token)) as http:
        async with http.post(f"{url}/workloads", data={"filter": "grayscale"}) as r:
            wid = (await r.json())["workload_id"]
        todo: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(images)):
            todo.put_nowait(i)

        async def uploader() -> None:
            while not todo.empty():
                i = todo.get_nowait()
                form = aiohttp.FormData()
                form.add_field("workload_id", wid)
                form.add_field("data", images[i], filename=f"{i}.png")
                async with http.post(f"{url}/images", data=form) as r:
                    assert r.status == 200, await r.text()

        polls = 0

        async def watcher() -> None:
            nonlocal polls
            while True:
                polls += 1
                async with http.get(f"{url}/workloads/{wid}") as r:
                    if finished(await r.json(), len(images)):
                        return
                await asyncio.sleep(WATCH_INTERVAL)

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(uploader() for _ in range(clients)), watcher()), TIMEOUT)
        return Push(wid, len(images), time.perf_counter() - t0, polls)


def aiohttp_push(url: str, token: str, images: list[bytes], clients: int) -> Push:
    """Push ``images`` with ``clients`` concurrent aiohttp uploaders; wait until all are filtered."""
    return asyncio.run(_aiohttp_push(url, token, images, clients))


# -- requests -----------------------------------------------------------------------------------

@contextmanager
def session(token: str) -> Iterator[requests.Session]:
    """A keep-alive ``requests`` session sending the token."""
    with requests.Session() as http:
        http.headers.update(ref.bearer(token))
        yield http


def upload(http: requests.Session, url: str, workload_id: str, index: int, data: bytes) -> int:
    """POST /images the reference's way (file first in ``data``, no part type); the image id."""
    body, ctype = ref.multipart({"workload_id": workload_id, "type": "original"}, "data", f"{index}.png", data)
    r = http.post(f"{url}/images", data=body, headers={"Content-Type": ctype}, timeout=60)
    r.raise_for_status()
    return r.json()["image_id"]


def workload(http: requests.Session, url: str, workload_id: str) -> dict:
    r = http.get(f"{url}/workloads/{workload_id}", timeout=60)
    r.raise_for_status()
    return r.json()


def watch(url: str, token: str, workload_id: str, images: int,
          abort: Callable[[], bool] = lambda: False) -> None:
    """Poll the workload every ``WATCH_INTERVAL`` until it is completed with all ``images``."""
    with session(token) as http:
        def done() -> bool:
            if abort():
                raise RuntimeError("an uploader failed")
            return finished(workload(http, url, workload_id), images)

        wait_until(done, TIMEOUT, f"workload {workload_id} to complete", WATCH_INTERVAL)


def requests_push(url: str | list[str], token: str, images: list[bytes], clients: int, filter_: str = "") -> Push:
    """Push ``images`` from ``clients`` threads, a ``requests.Session`` each, and a watcher thread.
    With several URLs (servers of one system), client k uploads through ``url[k % len(url)]``.
    ``filter_``: the workload's filter or pipeline (else the bodiless POST: grayscale)."""
    urls = [url] if isinstance(url, str) else url
    url = urls[0]
    if filter_:
        with session(token) as http:
            r = http.post(f"{url}/workloads", data={"filter": filter_}, timeout=30)
            r.raise_for_status()
            wid = r.json()["workload_id"]
    else:
        wid = ref.create_workload(url, token)["workload_id"]
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(images)):
        todo.put(i)
    failed = threading.Event()

    def uploader(k: int) -> None:
        try:
            with session(token) as http:
                while True:
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        return
                    upload(http, urls[k % len(urls)], wid, i, images[i])
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(clients + 1) as pool:
        t0 = time.perf_counter()
        futures = [pool.submit(uploader, k) for k in range(clients)]
        futures.append(pool.submit(watch, urls[-1], token, wid, len(images), failed.is_set))
        for f in futures:
            f.result()
        return Push(wid, len(images), time.perf_counter() - t0)


def is_filtered(http: requests.Session, url: str, workload_id: str, image_id: int) -> bool:
    """Whether the workload lists ``image_id`` among its ``filtered_images`` (the contract's signal)."""
    return image_id in workload(http, url, workload_id)["filtered_images"]


def round_trips(url: str, token: str, images: list[bytes]) -> tuple[str, list[float]]:
    """One image at a time: upload, poll ``GET /workloads/{id}`` until its id is among the
    ``filtered_images``. Returns the workload id and each round trip's wall time (ms), sorted."""
    wid = ref.create_workload(url, token)["workload_id"]
    times = []
    with session(token) as http:
        for i, data in enumerate(images):
            t0 = time.perf_counter()
            image_id = upload(http, url, wid, i, data)
            wait_until(partial(is_filtered, http, url, wid, image_id), 60, f"image {image_id} to be filtered",
                       ROUND_TRIP_POLL)
            times.append((time.perf_counter() - t0) * 1000)
    return wid, sorted(times)


# -- the dpip CLI -------------------------------------------------------------------------------

def cli_push(url: str, token: str, password: str, files: list[Path], jobs: int, config_home: Path) -> Push:
    """``dpip login``, then time ``dpip push --jobs JOBS FILES...`` (process start included)
    until the workload it printed is completed."""
    env = clean_env(XDG_CONFIG_HOME=str(config_home), DPIP_URL=url, DPIP_PASSWORD=password)
    subprocess.run([DPIP, "login"], env=env, check=True, capture_output=True)
    t0 = time.perf_counter()
    out = subprocess.run([DPIP, "push", "--quiet", "--jobs", str(jobs), *map(str, files)],
                         env=env, check=True, capture_output=True, text=True).stdout
    wid = out.split()[-1]
    watch(url, token, wid, len(files))
    return Push(wid, len(files), time.perf_counter() - t0)
