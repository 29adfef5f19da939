"""A stand-in for the real PostgreSQL fixture (tests/engines.py, coming): a local server on
port 55432 if one runs, else the PostgreSQL cases skip with the reason."""

import asyncio
import re
import threading
import uuid

import asyncpg
import pytest


class _DevPg:
    admin = "postgresql://postgres@127.0.0.1:55432/postgres"

    def new_database(self, name: str) -> str:
        name = re.sub(r"[^a-z0-9_]", "_", name.lower())[:40] + "_" + uuid.uuid4().hex[:6]

        async def make() -> None:
            c = await asyncpg.connect(self.admin)
            try:
                await c.execute(f'CREATE DATABASE "{name}" OWNER dpip')
            finally:
                await c.close()

        t = threading.Thread(target=lambda: asyncio.run(make()))
        t.start()
        t.join()
        return f"postgresql://dpip:pw@127.0.0.1:55432/{name}"


@pytest.fixture(scope="session")
def postgres():
    async def probe() -> None:
        c = await asyncpg.connect(_DevPg.admin, timeout=2)
        await c.close()
    try:
        asyncio.run(probe())
    except (OSError, asyncpg.PostgresError) as e:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:55432 ({e})")
    return _DevPg()
