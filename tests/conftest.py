"""Shared fixtures: an in-process app for API tests, a real multi-process system for e2e."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from api.app import create_app
from api.settings import ServerSettings
from scripts.localsys import LocalSystem, free_port

ADMIN_PASSWORD = "test-admin-pw"


def png_bytes(width: int = 64, height: int = 48, colour=(200, 100, 50), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


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
    return await aiohttp_client(create_app(settings))


@pytest.fixture(scope="module")
def system(tmp_path_factory) -> Iterator[LocalSystem]:
    """A real server and two real workers (one started the reference's way, with old flags)."""
    base = tmp_path_factory.mktemp("system")
    sysm = LocalSystem(base / "data", log_dir=base / "logs", admin_password=ADMIN_PASSWORD)
    try:
        sysm.start_server()
        sysm.start_worker("w1", "--tags", "fast,blue")
        sysm.start_worker("w2", reference_form=True, name_flag="--node-name")
        sysm.wait_workers({"w1", "w2"})
        yield sysm
    except BaseException:
        print(sysm.logs())
        raise
    finally:
        sysm.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On an e2e failure, attach the processes' logs to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "system" in item.fixturenames:
        sysm = item.funcargs.get("system")
        if sysm is not None:
            report.sections.append(("dpip processes", sysm.logs()))
