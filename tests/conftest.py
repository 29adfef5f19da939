"""Shared fixtures: an in-process app for API tests, a real multi-process system for e2e."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.services import build_app
from server.settings import ServerSettings
from tests.engines import postgres, s3  # noqa: F401  (session fixtures: real PostgreSQL and S3)
from tests.helpers import ADMIN_PASSWORD, LocalSystem, free_port


@pytest.fixture
def settings(tmp_path: Path) -> ServerSettings:
    return ServerSettings(
        host="127.0.0.1",
        port=free_port(),
        controller_port=free_port(),
        data_dir=tmp_path / "data",
        admin_password=ADMIN_PASSWORD,
        fsync=False,
    )


@pytest.fixture
async def client(aiohttp_client, settings):
    """An aiohttp test client on the real app (real SQLite, real controller socket)."""
    return await aiohttp_client(build_app(settings))


@pytest.fixture(scope="module")
def system(tmp_path_factory) -> Iterator[LocalSystem]:
    """A real server and two real workers (one started the reference's way, with old flags)."""
    base = tmp_path_factory.mktemp("system")
    sysm = LocalSystem(base / "data", log_dir=base / "logs", admin_password=ADMIN_PASSWORD)
    with sysm:  # its logs are printed if this fails
        sysm.start_server()
        sysm.start_worker("w1", "--tags", "fast,blue")
        sysm.start_worker("w2", reference_form=True, name_flag="--node-name")
        sysm.wait_workers({"w1", "w2"})
        yield sysm


@pytest.fixture
def make_system(tmp_path):
    """A factory of real systems (server started, no workers); all stopped at teardown."""
    systems: list[LocalSystem] = []

    def make(*server_args: str) -> LocalSystem:
        n = len(systems)
        s = LocalSystem(tmp_path / f"data{n}", log_dir=tmp_path / f"logs{n}",
                        admin_password=ADMIN_PASSWORD, server_args=server_args)
        systems.append(s)
        s.start_server()
        return s

    make.systems = systems  # type: ignore[attr-defined]
    yield make
    for s in systems:
        s.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, attach the DPIP processes' logs to the report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    systems = []
    if "system" in item.fixturenames and item.funcargs.get("system") is not None:
        systems.append(item.funcargs["system"])
    if "make_system" in item.fixturenames and item.funcargs.get("make_system") is not None:
        systems.extend(item.funcargs["make_system"].systems)
    for n, sysm in enumerate(systems):
        report.sections.append((f"dpip processes ({n})", sysm.logs()))
