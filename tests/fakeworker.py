"""An impersonated worker: test code speaking the real protocol over real nng sockets.

It publishes crafted heartbeats (any CPU, memory, GPU, capacity, tags, running jobs), takes
the controller's welcome, records every job it is sent and holds it until the test releases
it; then it really does the job (download, grayscale, upload) and replies, like a worker.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field, replace

import aiohttp
import pynng

from common import wire
from common.rpc import RpcServer
from worker.filters import process


@dataclass
class Telemetry:
    cpu_percent: float = 10.0
    memory_percent: float = 10.0
    gpu: wire.Gpu = field(default_factory=wire.Gpu)
    capacity: int = 2
    tags: list[str] = field(default_factory=list)
    running_job_ids: list[int] = field(default_factory=list)  # jobs "from elsewhere"


class FakeWorker:
    def __init__(self, name: str, controller: str, telemetry: Telemetry, filter_override: str = "") -> None:
        self.name = name
        self.filter_override = filter_override  # to tell this worker's results apart
        self.controller = controller
        self.telemetry = telemetry
        self.session = uuid.uuid4().hex
        self.jobs: list[wire.RunJob] = []
        self.uploads = 0  # results it uploaded (answered 200)
        self.token = ""
        self.api_url = ""
        self.epoch = ""
        self._release: dict[int, asyncio.Event] = {}
        self._rpc = RpcServer(self._handle, concurrency=16)
        self._pub = pynng.Pub0()
        self._task: asyncio.Task | None = None
        self.rpc_address = ""

    async def start(self) -> FakeWorker:
        self.rpc_address = self._rpc.listen("tcp://127.0.0.1:0")
        self._rpc.start()
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
        while True:
            t = self.telemetry
            held = [j.job_id for j in self.jobs if not self._release[j.job_id].is_set()]
            hb = wire.Heartbeat(
                name=self.name, session=self.session, rpc_address=self.rpc_address, tags=t.tags,
                cpu_percent=t.cpu_percent, memory_percent=t.memory_percent, gpu=t.gpu,
                running_jobs=len(held) + len(t.running_job_ids), capacity=t.capacity, jobs_done=0,
                welcomed_by=self.epoch, running_job_ids=held + t.running_job_ids,
            )
            await self._pub.asend(wire.encode(hb))
            await asyncio.sleep(0.2)

    async def _handle(self, msg: wire.Message) -> wire.Message:
        if isinstance(msg, wire.Welcome):
            self.token, self.epoch = msg.token, msg.epoch
            self.api_url = msg.public_url or f"http://127.0.0.1:{msg.api_port}"
            return wire.Ack()
        if isinstance(msg, wire.RunJob):
            self.jobs.append(msg)
            ev = self._release.setdefault(msg.job_id, asyncio.Event())
            await ev.wait()
            await self._do(msg)
            return wire.JobResult(msg.job_id, ok=True, worker=self.name)
        return wire.Ack()

    async def _do(self, msg: wire.RunJob) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            params = {"workload_id": msg.workload_id, "type": "original"}
            async with http.get(f"{self.api_url}/images/{msg.image_id}", params=params) as r:
                assert r.status == 200, await r.text()
                data = await r.read()
            out, _ = process(data, self.filter_override or msg.filter)
            form = aiohttp.FormData({"workload_id": msg.workload_id, "type": "filtered",
                                     "image_id": str(msg.image_id)})
            form.add_field("data", out, filename=f"{msg.image_id}.png")
            async with http.post(f"{self.api_url}/images", data=form) as r:
                assert r.status == 200, await r.text()
            self.uploads += 1

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.release_all()
        await self._rpc.close()
        self._pub.close()
