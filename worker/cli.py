"""``python -m worker`` / ``worker/main.py``: parse flags (and DPIP_* env), run a worker."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from common import aio
from common.config import (
    CONTROLLER_PORT,
    EnvDefaultsParser,
    add_options,
    secrets_in_flags,
    setup_logging,
    split_host_port,
)
from filtering import registry
from plane.tls import TlsError
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
    p.add_argument("--png-compress-level", type=int, default=EncodeOptions.png_compress_level,
                   choices=range(0, 10), metavar="0-9",
                   help="zlib level for PNG output (default 1: fast; Pillow's own default is 6)")
    fields = add_options(p, WorkerSettings)
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    setup_logging(a.log_level)
    registry.load_plugins()  # each broken plugin: one line, and the worker runs without it
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
    if not -1 <= a.prefetch <= 4096:
        p.error("--prefetch must be between 0 and 4096 (or -1: the default)")
    for flag in ("slow_rate", "fail_rate"):
        if not 0.0 <= getattr(a, flag) <= 1.0:
            p.error(f"--{flag.replace('_', '-')} must be between 0 and 1")
    return WorkerSettings(
        controller_host=host,
        controller_port=port,
        controllers=controllers,
        name=a.worker_name or f"{os.uname().nodename}-{os.getpid()}",
        tags=tuple(t.strip() for t in a.tags.split(",") if t.strip()),
        encode=EncodeOptions(png_compress_level=a.png_compress_level),
        **{f.name: getattr(a, f.name) for f in fields},
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
    settings = parse_args(argv)
    try:
        aio.run(run(settings))
    except TlsError as e:  # a certificate that cannot be used: one line naming it
        logger.error("%s", e)
        sys.exit(2)
