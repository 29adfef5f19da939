"""Real engines for the tests (harness/engines.py): a throwaway PostgreSQL cluster and a
SeaweedFS S3 server, started once per session; a machine that cannot run one skips the tests
that need it, saying why (in CI, ``CI=true``, they fail instead)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.engines import EngineError, EngineUnavailable, Postgres, SeaweedS3
from tests.helpers import unavailable

__all__ = ["EngineError", "EngineUnavailable", "Postgres", "SeaweedS3", "postgres", "s3"]


def _session_engine(kind: type, name: str) -> Iterator:
    try:
        engine = kind()
    except EngineUnavailable as e:
        unavailable(f"{name} cannot run here: {e}")
    try:
        engine.setup()
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL for the session: ``.url`` (role and database dpip), ``.new_database``,
    ``.stop()``/``.start()`` for an outage."""
    yield from _session_engine(Postgres, "PostgreSQL")


@pytest.fixture(scope="session")
def s3() -> Iterator[SeaweedS3]:
    """A real S3 server (SeaweedFS) for the session: ``.endpoint``, keys, ``.env()``,
    ``.new_bucket_name``, ``.stop()``/``.start()`` for an outage (data kept)."""
    yield from _session_engine(SeaweedS3, "SeaweedFS S3")
