"""An impersonated worker: test code speaking the real protocol over real nng sockets.

It publishes crafted heartbeats (any CPU, memory, GPU, capacity, tags, running jobs), takes
the controller's welcome through the real :class:`~worker.link.WorkerLink`, records every job
it is sent and holds it until the test releases it; then it really does the job (the original it
carries or downloads with the job's capability, grayscale, the result sent back with the job's
end or uploaded) and answers the session's Exchange, like a worker.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass, field, replace

import aiohttp
import pynng
from PIL import Image, ImageOps, PngImagePlugin

from plane import localjoin, wire
from plane.rpc import RpcServer
from worker.filters import process
from worker.link import ControllerLink, Refused, WorkerLink
from worker.sessions import Sessions

logger = logging.getLogger(__name__)


@dataclass
class Telemetry:
    cpu_percent: float = 10.0
    memory_percent: float = 10.0
    gpu: wire.Gpu = field(default_factory=wire.Gpu)
    capacity: int = 2
    tags: list[str] = field(default_factory=list)
    running_job_ids: list[int] = field(default_factory=list)  # jobs "from elsewhere"


#: The position a lying worker makes up, and the text it adds.
MADE_UP_GPS = {1: "N", 2: (48.0, 51.0, 24.0), 3: "W", 4: (2.0, 21.0, 7.0)}


def with_metadata(png: bytes) -> bytes:
    """The same PNG with EXIF (a GPS position) and a text chunk added."""
    exif = Image.Exif()
    exif[0x8825] = MADE_UP_GPS
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "taken at the made-up place")
    with Image.open(io.BytesIO(png)) as im:
        buf = io.BytesIO()
        im.save(buf, "PNG", exif=exif.tobytes(), pnginfo=info)
    return buf.getvalue()


class FakeWorker:
    def __init__(self, name: str, controller: str, telemetry: Telemetry, filter_override: str = "",
                 join_token: str | None = "", lie: bool = False, inline: str = "", refuse: bool = False,
                 metadata: bool = False, ignore_cancels: bool = False) -> None:
        self.name = name
        self.filter_override = filter_override  # "inverted": results told apart by their pixels
        self.controller = controller
        self.telemetry = telemetry
        # "": the token the server left for this machine's workers, as a real local worker
        # finds it; None: no token at all (a process without credentials)
        port = int(controller.rsplit(":", 1)[1])
        self.link = WorkerLink(name, (lambda: localjoin.read(port)) if join_token == "" else join_token or "")
        self.lie = lie  # reply "done" without storing anything
        self.refuse = refuse  # reply "cannot decode, no retry can help" to every job
        self.metadata = metadata  # results carry EXIF (a made-up GPS position) and a text chunk
        self.ignore_cancels = ignore_cancels  # a cancelled job is still done, and its result sent
        self.finished = 0  # jobs it did whole (its result uploaded or sent back)
        # "" or "yes": as a worker does (the image with the job, else over HTTP with the job's
        # capability); "wrong": send back a colour image (never a grayscale)
        self.inline = inline
        self.sent: list[bytes] = []  # the last messages it published (for replay tests)
        self.session = self.link.session
        self.jobs: list[wire.RunJob] = []
        self.uploads = 0  # results it uploaded (answered 200)
        self.token = ""  # set once welcomed (the session's key id)
        self.api_url = ""
        self._release: dict[int, asyncio.Event] = {}
        self._rpc = RpcServer(self._handle, concurrency=16)
        host, _, cport = controller.rpartition(":")
        self._controller_link = ControllerLink(host, int(cport), self.link)
        self._outbox = self._controller_link.outbox
        self._sessions = Sessions(self, lambda kid: self._controller_link)
        self._tasks: set[asyncio.Task] = set()
        self.cancels: list[int] = []  # the jobs the server cancelled
        self._pub = pynng.Pub0()
        self._task: asyncio.Task | None = None
        self._closing = False
        self.rpc_address = ""
        self.beat_errors: list[str] = []  # what went wrong in a heartbeat (it carries on)

    async def start(self) -> FakeWorker:
        self.rpc_address = self._rpc.listen("tcp://127.0.0.1:0")
        self._rpc.start()
        port = await self._sessions.start("127.0.0.1")
        self.link.joined = replace(self.link.joined, session_port=port)
        self._pub.dial(f"tcp://{self.controller}", block=False)
        self._task = asyncio.create_task(self._beat())
        return self

    def job_ids(self) -> list[int]:
        return [j.image_id for j in self.jobs]

    def release_all(self) -> None:
        for ev in self._release.values():
            ev.set()

    def set(self, **changes) -> None:
        self.telemetry = replace(self.telemetry, **changes)

    async def _beat(self) -> None:
        """Heartbeats until closed. One that fails is recorded and the next one goes anyway: a
        heartbeat loop that died silently would get the fake declared dead mid-test."""
        while not self._closing:
            try:
                await self._beat_once()
            except pynng.Closed:
                return
            except Exception as e:  # recorded for the test's failure message, never fatal
                logger.warning("fake worker %s: heartbeat failed: %r", self.name, e)
                self.beat_errors = [*self.beat_errors[-9:], repr(e)]
            await asyncio.sleep(0.2)  # the heartbeat period, not a synchronisation

    async def _beat_once(self) -> None:
        t = self.telemetry
        held = [j.job_id for j in self.jobs if not self._release[j.job_id].is_set()]
        hb = wire.Heartbeat(
            name=self.name, session=self.session, tags=t.tags,
            cpu_percent=t.cpu_percent, memory_percent=t.memory_percent, gpu=t.gpu,
            running_jobs=len(held) + len(t.running_job_ids), capacity=t.capacity, jobs_done=0,
            running_job_ids=held + t.running_job_ids,
        )
        for data in (self.link.hello(self.rpc_address), self.link.publish(hb)):
            if data is not None:
                await self._pub.asend(data)
                self.sent = [*self.sent[-9:], data]

    async def _handle(self, msg: wire.Message) -> wire.Message | wire.Parts:
        try:
            if isinstance(msg, wire.Welcome):
                reply = self.link.accept_welcome(msg)
                self.token = self.link.kid
                self.api_url = msg.public_url or f"http://127.0.0.1:{msg.api_port}"
                return reply
            if not isinstance(msg, wire.Sealed):
                raise Refused("unsealed")
            inner, _, channel = self.link.open(msg)
        except Refused as e:
            return wire.Ack(ok=False, error=str(e))
        return channel.seal_reply(wire.Ack(ok=False, error=f"unexpected {inner.TYPE}"), msg.seq)

    def exchange(self, msg: wire.Exchange, c: ControllerLink) -> None:
        """The session's messages (:class:`worker.sessions.Sessions` calls this)."""
        self._outbox.ack(msg.acks)
        for job in msg.jobs:
            self.jobs.append(job)
            task = asyncio.create_task(self._job(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        for job_id in msg.cancels:
            self.cancels.append(job_id)
            self._release.setdefault(job_id, asyncio.Event()).set()
            self._outbox.stopped(job_id)

    async def _job(self, job: wire.RunJob) -> None:
        """Hold the job until released, then end it as told (its end waits for an Exchange)."""
        ev = self._release.setdefault(job.job_id, asyncio.Event())
        if self._closing:
            ev.set()  # closing: hold nothing, so that closing never waits on a held job
        await ev.wait()
        if job.job_id in self.cancels and not self.ignore_cancels:
            return self._outbox.put(wire.JobResult(job.job_id, ok=False, worker=self.name, error="cancelled"))
        if self.refuse:
            return self._outbox.put(wire.JobResult(job.job_id, ok=False, worker=self.name,
                                                   error="cannot decode the image", retryable=False))
        payload = b""
        try:
            if not self.lie:
                payload = await self._do(job)
        except Exception as e:  # told to the server, as a worker would
            return self._outbox.put(wire.JobResult(job.job_id, ok=False, worker=self.name, error=repr(e)))
        self.finished += not self.lie
        self._outbox.put(wire.JobResult(job.job_id, ok=True, worker=self.name, payload=payload))

    async def _do(self, msg: wire.RunJob) -> bytes:
        """The job done as a worker does it: the original it carries, or downloaded with its
        capability; the result sent back with its end, or uploaded with the capability."""
        headers = {"Authorization": f"Bearer {msg.capability}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            data = msg.payload
            if not data:
                params = {"workload_id": msg.workload_id, "type": "original"}
                async with http.get(f"{self.api_url}/images/{msg.image_id}", params=params) as r:
                    assert r.status == 200, await r.text()
                    data = await r.read()
            out = self._result_of(data, msg)
            if msg.payload:
                return out
            form = aiohttp.FormData({"workload_id": msg.workload_id, "type": "filtered",
                                     "image_id": str(msg.image_id)})
            form.add_field("data", out, filename=f"{msg.image_id}.png")
            async with http.post(f"{self.api_url}/images", data=form) as r:
                assert r.status == 200, await r.text()
            self.uploads += 1
            return b""

    def _result_of(self, original: bytes, msg: wire.RunJob) -> bytes:
        if self.inline == "wrong":
            with Image.open(io.BytesIO(original)) as im:
                buf = io.BytesIO()
                Image.new("RGB", im.size, (200, 10, 10)).save(buf, "PNG")
            return buf.getvalue()
        out, _ = process(original, msg.filter)
        if self.metadata:
            out = with_metadata(out)
        if self.filter_override == "inverted":  # a valid-looking result, told apart by its pixels
            with Image.open(io.BytesIO(out)) as im:
                buf = io.BytesIO()
                ImageOps.invert(im).save(buf, "PNG")
            out = buf.getvalue()
        return out

    async def close(self) -> None:
        self._closing = True
        self._pub.close()  # sockets first, then the tasks that wait on them
        self.release_all()
        await self._rpc.close()  # bounded: it abandons what does not stop in time
        await self._sessions.close()
        for task in list(self._tasks):
            task.cancel()
        if self._task:
            self._task.cancel()
            done, _ = await asyncio.wait([self._task], timeout=5)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved, so never reported at exit
