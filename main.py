"""DPIP server: the HTTP API, the controller and the scheduler in one process (like main.go).

    .venv/bin/python main.py [--host H] [--port P] [--controller-port C] [--data-dir D]

Every flag also reads a DPIP_* variable (``--controller-port`` <- ``DPIP_CONTROLLER_PORT``).
``python main.py users add|remove|list`` manages users; ``python main.py certs init|worker``
makes TLS certificates (:mod:`admin.certs`).
SIGINT or SIGTERM stops it cleanly.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from aiohttp import web
from PIL import Image

from admin import users
from api.connections import GuardedRunner, raise_fd_limit
from common import aio
from common.config import setup_logging
from filtering import registry
from plane.tls import ServerTls, TlsError, nng_url
from server.services import before_stop, build_app
from server.settings import (
    ServerSettings,
    connection_policy,
    parse_server_args,
    secret_warnings,
)

logger = logging.getLogger("dpip")


def dump_tasks() -> None:
    """Log every asyncio task's stack: the way to see what a stuck server waits for."""
    for task in asyncio.all_tasks():
        buf = io.StringIO()
        task.print_stack(limit=8, file=buf)
        logger.warning("task %s:\n%s", task.get_name(), buf.getvalue())


async def serve(settings: ServerSettings, tls: ServerTls | None = None) -> None:
    """Run until SIGINT/SIGTERM, then close the API, controller and scheduler in order. A start
    that fails (a port in use) unwinds whatever it had opened before it raises."""
    app = build_app(settings, tls)
    access_log = logging.getLogger("aiohttp.access") if settings.access_log else None
    # Slow clients and connection caps (api/connections.py): the total comes from the open-file
    # limit, raised first to its hard limit.
    policy = connection_policy(settings, raise_fd_limit())
    runner = GuardedRunner(app, policy, access_log=access_log, handle_signals=False)
    try:
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True,
                           ssl_context=tls.http() if tls is not None else None)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    logger.info("API on %s://%s:%d, controller on %s, data in %s", settings.scheme, settings.host, settings.port,
                nng_url(settings.host, settings.controller_port, tls is not None), settings.data_dir)
    if tls is not None:
        logger.info("TLS: certificate %s; workers %s", tls.identity.cert_file,
                    f"must present a certificate of {tls.client_ca_file}" if tls.mutual
                    else "are not asked for certificates (no --tls-client-ca)")
    logger.info("connections: %s", policy.describe())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)  # `kill -USR1 <pid>`: what is it doing?
    try:
        await stop.wait()
        logger.info("shutting down")
    finally:
        await before_stop(app)
        await runner.cleanup()
    logger.info("stopped")


def limit_pixels(max_pixels: int) -> None:
    """Pillow refuses to decode an image larger than we accept (by default it would warn only
    up to twice its own limit, 89 MP): a stored file can never become a decompression bomb."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # Everything we create (the database with its password hashes, images, secrets, temporary
    # files) is the owner's only. The users command may create the database too.
    os.umask(0o077)
    if argv[:1] == ["users"]:
        sys.exit(users.main(argv[1:]))
    if argv[:1] == ["certs"]:
        from admin import certs
        sys.exit(certs.main(argv[1:]))
    settings, level = parse_server_args(argv)
    setup_logging(level)
    registry.load_plugins()  # the server's own plugins (others are known from the workers that run them)
    for warning in secret_warnings(argv, settings):
        logger.warning(warning)
    limit_pixels(settings.max_pixels)
    tls = None
    if settings.uses_tls:
        try:
            tls = ServerTls(Path(settings.tls_cert), Path(settings.tls_key),
                            Path(settings.tls_client_ca) if settings.tls_client_ca else None)
        except TlsError as e:
            logger.error("%s", e)
            sys.exit(2)
    aio.run(serve(settings, tls))


if __name__ == "__main__":
    main()
