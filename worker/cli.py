"""``python -m worker`` / ``worker/main.py``: parse flags (and DPIP_* env), run a worker."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from common import aio
from common.config import CONTROLLER_PORT, EnvDefaultsParser, secrets_in_flags, setup_logging, split_host_port
from worker.filters import EncodeOptions
from worker.service import Worker, WorkerSettings

logger = logging.getLogger(__name__)

#: Flags that carry a secret, and the variable to use instead.
SECRET_FLAGS = {"--join-token": "DPIP_JOIN_TOKEN", "--image-store-token": "DPIP_IMAGE_STORE_TOKEN"}


def parse_args(argv: list[str] | None = None) -> WorkerSettings:
    p = EnvDefaultsParser(prog="worker", description="A DPIP worker: filters images for the server.")
    p.add_argument("--controller", default=f"localhost:{CONTROLLER_PORT}",
                   help="controller HOST:PORT, or several, comma-separated (the servers of one system:"
                        " the worker heartbeats to each and takes jobs from whichever leads)")
    p.add_argument("--worker-name", "--node-name", dest="worker_name", default=None,
                   help="unique name of this worker (default: host name and pid)")
    p.add_argument("--tags", default="", help="comma-separated tags, e.g. gpu,largeMemory")
    p.add_argument("--capacity", type=int, default=os.cpu_count() or 1,
                   help="jobs run at once (default: number of cores)")
    p.add_argument("--advertise-host", default="",
                   help="address the server dials for RPC (default: our address towards the controller)")
    p.add_argument("--rpc-bind", default="", help="address to listen on for RPC (default: the advertised one)")
    p.add_argument("--rpc-port", type=int, default=0, help="RPC port (default: any free port)")
    p.add_argument("--image-store-endpoint", default="",
                   help="API URL, overriding what the controller says (every image then goes"
                        " through it, none inline)")
    p.add_argument("--image-store-token", default="", help="API token, overriding what the controller sends")
    p.add_argument("--png-compress-level", type=int, default=1, choices=range(0, 10), metavar="0-9",
                   help="zlib level for PNG output (default 1: fast; Pillow's own default is 6)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats until the controller sets it")
    p.add_argument("--slow-rate", type=float, default=0.0, help="fault knob: share of jobs made slow (0-1)")
    p.add_argument("--slow-ms", type=float, default=0.0, help="fault knob: how much slower, in ms")
    p.add_argument("--fail-rate", type=float, default=0.0,
                   help="fault knob: share of jobs dropped without any reply (0-1)")
    p.add_argument("--join-token", default="",
                   help="the controller's join token, if it requires one (better: the env variable)")
    p.add_argument("--exit-with-parent", action="store_true",
                   help="drain and exit when the process that started us ends (the server's autoscaler uses it)")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    setup_logging(a.log_level)
    for warning in secrets_in_flags(sys.argv[1:] if argv is None else argv, SECRET_FLAGS):
        logger.warning(warning)
    try:
        controllers = tuple(split_host_port(c.strip(), "localhost", CONTROLLER_PORT)
                            for c in a.controller.split(",") if c.strip())
    except ValueError as e:
        p.error(f"--controller: {e}")
    if not controllers:
        p.error("--controller needs HOST:PORT")
    if len(set(controllers)) != len(controllers):
        p.error("--controller names a controller twice")
    host, port = controllers[0]
    if a.capacity < 1:
        p.error("--capacity must be at least 1")
    for flag in ("slow_rate", "fail_rate"):
        if not 0.0 <= getattr(a, flag) <= 1.0:
            p.error(f"--{flag.replace('_', '-')} must be between 0 and 1")
    return WorkerSettings(
        controller_host=host,
        controller_port=port,
        controllers=controllers,
        name=a.worker_name or f"{os.uname().nodename}-{os.getpid()}",
        tags=tuple(t.strip() for t in a.tags.split(",") if t.strip()),
        capacity=a.capacity,
        advertise_host=a.advertise_host,
        rpc_bind=a.rpc_bind,
        rpc_port=a.rpc_port,
        image_store_endpoint=a.image_store_endpoint,
        image_store_token=a.image_store_token,
        heartbeat_interval=a.heartbeat_interval,
        encode=EncodeOptions(png_compress_level=a.png_compress_level),
        slow_rate=a.slow_rate,
        slow_ms=a.slow_ms,
        fail_rate=a.fail_rate,
        join_token=a.join_token,
        exit_with_parent=a.exit_with_parent,
    )


async def run(settings: WorkerSettings) -> None:
    """Run until SIGINT/SIGTERM: the first drains (finish running jobs), a second exits at once."""
    worker = Worker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            logger.warning("second signal: exiting now")
            os._exit(1)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    watch = asyncio.create_task(_parent_watch(stop)) if settings.exit_with_parent else None
    await worker.start()
    try:
        await stop.wait()
        logger.info("stopping: no new jobs, finishing running ones")
        await worker.drain()
    finally:
        if watch is not None:
            watch.cancel()
        await worker.close()
    logger.info("worker %s stopped", settings.name)


async def _parent_watch(stop: asyncio.Event, interval: float = 1.0) -> None:
    """Orphaned (the server was killed), we would serve nobody forever: drain and leave."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(interval)
    logger.warning("the process that started us (pid %d) is gone: stopping", parent)
    stop.set()


def main(argv: list[str] | None = None) -> None:
    aio.run(run(parse_args(argv)))
