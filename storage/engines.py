"""Which engine a storage URL names, decided in one place (the server, ``main.py users`` and
the benches all open datastores by URL)."""

from __future__ import annotations

from pathlib import Path

from storage.datastore import Datastore

SQLITE = "sqlite:///"
POSTGRES = ("postgresql://", "postgres://")
FILES = "file://"
S3 = "s3://"
#: The SQLite file's name in a data dir, when ``--database`` names none.
SQLITE_FILE = "dpip.sqlite3"


def is_sqlite(url: str) -> bool:
    """Whether the datastore URL names SQLite (an empty one does: the data dir's file)."""
    return not url or url.startswith(SQLITE)


def sqlite_path(url: str, data_dir: Path) -> Path:
    """The SQLite file a datastore URL names, or the data dir's."""
    return Path(url[len(SQLITE):]) if url.startswith(SQLITE) else data_dir / SQLITE_FILE


def open_datastore(url: str, data_dir: Path) -> Datastore:
    """The datastore ``url`` names: ``sqlite:///PATH`` (by default the data dir's file) or
    ``postgresql://...``; not opened yet."""
    if is_sqlite(url):
        from storage.sqlite import SqliteDatastore
        return SqliteDatastore(sqlite_path(url, data_dir))
    if not url.startswith(POSTGRES):
        raise ValueError("the datastore is sqlite:///PATH or postgresql://USER[:PASSWORD]@HOST:PORT/DB")
    from storage.postgres import (
        PostgresDatastore,  # only deployments on PostgreSQL need asyncpg loaded
    )
    return PostgresDatastore(url)
