"""The PostgreSQL datastore (asyncpg): the same scripts as SQLite's (:mod:`storage.queries`),
for deployments past one machine, where several servers share one database.

A script runs on a pooled connection inside one transaction; the pool's connections commit
without waiting for the disk (``synchronous_commit = off``: PostgreSQL flushes its WAL a moment
later, in order, as SQLite's lazy groups do) and a durable transaction says ``SET LOCAL
synchronous_commit`` to the database's own setting; a read, or a write that need not be durable,
of one statement runs without a transaction of its own (one round trip). Concurrent
transactions are PostgreSQL's business: row locks serialize those that touch one workload (its counters are kept by triggers, as in
SQLite). The schema is created, or migrated, at start under an advisory lock, so servers that
start together do not race. A job inserted by any server is announced on the channel
``dpip_jobs`` (a trigger), which the leading server listens to.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Callable
from typing import TypeVar

import asyncpg

from common.models import Job, Unavailable
from storage import jobrows, schema, sql
from storage.queries import SqlDatastore
from storage.sql import Result, Script, Statement, UniqueViolation

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Notified whenever a job is inserted (by any server): its facts as a JSON array, or its id.
JOBS_CHANNEL = "dpip_jobs"
#: A notification carries a job's facts up to this many bytes (PostgreSQL's limit is 8000), else its id.
NOTIFY_FACTS_BYTES = 7900
SCHEMA_LOCK = 0x6470_6970  # "dpip": the advisory lock held while the schema is created
SCHEMA_VERSION = 1

SCHEMA = schema.create_all(schema.POSTGRESQL) + "\n".join(
    schema.added_columns(schema.POSTGRESQL, "workloads") + schema.added_columns(schema.POSTGRESQL, "images")) + f"""

CREATE OR REPLACE FUNCTION dpip_images_counted() RETURNS trigger AS $$
BEGIN
    UPDATE workloads SET {schema.images_counted(schema.POSTGRESQL)} WHERE id = NEW.workload_id;
    RETURN NULL;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS images_counted ON images;
CREATE TRIGGER images_counted AFTER INSERT ON images FOR EACH ROW EXECUTE FUNCTION dpip_images_counted();

CREATE OR REPLACE FUNCTION dpip_jobs_counted() RETURNS trigger AS $$
BEGIN
    IF OLD.state IS DISTINCT FROM NEW.state THEN
        UPDATE workloads SET {schema.jobs_counted(schema.POSTGRESQL)} WHERE id = NEW.workload_id;
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS jobs_counted ON jobs;
CREATE TRIGGER jobs_counted AFTER UPDATE OF state ON jobs FOR EACH ROW EXECUTE FUNCTION dpip_jobs_counted();

CREATE OR REPLACE FUNCTION dpip_job_announced() RETURNS trigger AS $$
DECLARE
    facts text;
BEGIN
    -- the job as the scheduler reads it (jobrows.queued's columns), so that the server that
    -- schedules needs no read of its own; only its id if that would not fit a notification
    SELECT json_build_array(NEW.id, NEW.workload_id, NEW.image_id, NEW.attempts, w.filter, w.tags::text,
                            i.size, w.params::text, w.dir, i.format, i.width, i.height, i.mode)::text
      INTO facts
      FROM workloads w JOIN images i ON i.workload_id = w.id AND i.image_id = NEW.image_id AND i.type = 'original'
     WHERE w.id = NEW.workload_id AND NEW.state = 'queued';
    IF facts IS NULL OR octet_length(facts) > {NOTIFY_FACTS_BYTES} THEN
        facts := NEW.id::text;
    END IF;
    PERFORM pg_notify('{JOBS_CHANNEL}', facts);
    RETURN NULL;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS job_announced ON jobs;
CREATE TRIGGER job_announced AFTER INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION dpip_job_announced();

CREATE OR REPLACE FUNCTION dpip_auth_changed() RETURNS trigger AS $$
BEGIN
    UPDATE auth_version SET version = version + 1;
    RETURN NULL;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS users_changed ON users;
CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION dpip_auth_changed();
DROP TRIGGER IF EXISTS revocations_changed ON revoked_tokens;
CREATE TRIGGER revocations_changed AFTER INSERT OR DELETE ON revoked_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION dpip_auth_changed();
"""

#: What a broken connection or a database that went away looks like through asyncpg.
CONNECTION_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError,
                     asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
                     asyncpg.exceptions.AdminShutdownError)
#: Transactions PostgreSQL chose to abort for others to go on (a deadlock it broke, a
#: serialisation conflict): nothing of them was written, and the same write may succeed now.
#: DPIP's transitions take their rows in one order (a job's, then its workload's), so these are
#: rare (bulk changes over many jobs); they are said as "try again", never as a 500.
RETRYABLE_ERRORS = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)


@functools.lru_cache(maxsize=1024)
def _prepared(sql_text: str) -> tuple[str, bool]:
    """The statement in PostgreSQL's placeholders, and whether it returns rows."""
    head = sql_text.lstrip()[:6].upper()
    return sql.numbered(sql_text), head == "SELECT" or " RETURNING " in sql_text.upper()


async def _execute(conn: asyncpg.Connection, statement: Statement) -> Result:
    text, returns_rows = _prepared(statement.sql)
    try:
        if returns_rows:
            rows = await conn.fetch(text, *statement.params)
            return Result(rows, len(rows))
        status = await conn.execute(text, *statement.params)
    except asyncpg.UniqueViolationError as e:
        raise UniqueViolation(str(e)) from e
    count = status.rsplit(" ", 1)[-1]  # "UPDATE 3", "INSERT 0 1", "DELETE 0"
    return Result([], int(count) if count.isdigit() else 0)


_BEGIN_LAZY = "BEGIN ISOLATION LEVEL READ COMMITTED"  # (the connection's own: synchronous_commit off)
_BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
#: Our connections commit without waiting for the disk unless a transaction says otherwise (a
#: lazy write of one statement then needs no transaction of its own: one round trip, not three;
#: recovery redoes what a crash of PostgreSQL loses of those); a durable one waits as the
#: database is configured to (``synchronous_commit`` as it was before our connections set it).
_LAZY_CONNECTIONS = {"synchronous_commit": "off"}


async def _kept_as_is(conn: asyncpg.Connection) -> None:
    """A connection back in the pool is left as it is (asyncpg still rolls back a transaction
    left open): nothing DPIP does outlives its transaction (settings are SET LOCAL, the schema's
    advisory lock is the transaction's, LISTEN has a connection of its own), so the reset query
    asyncpg sends by default would be a round trip per transaction for nothing."""


def unavailable(e: BaseException) -> Unavailable:
    return Unavailable(f"the database is unavailable ({type(e).__name__}); try again shortly")


class PostgresDatastore(SqlDatastore):
    """The datastore on a PostgreSQL database (``postgresql://USER[:PW]@HOST:PORT/DB``)."""

    shared = True  # other servers may write to it too
    modifying_ctes = True

    def __init__(self, url: str, pool_size: int = 10, timeout: float = 10.0) -> None:
        self.url = url
        self.pool_size = pool_size
        self.timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._begin = _BEGIN_LAZY  # (set by open(): with the database's own synchronous_commit)

    def __repr__(self) -> str:
        return f"PostgresDatastore({_without_password(self.url)})"

    async def open(self) -> None:
        try:
            probe = await asyncpg.connect(self.url, timeout=self.timeout)
            try:
                configured = await probe.fetchval("SHOW synchronous_commit")
            finally:
                await probe.close()
            if configured not in ("on", "off", "local", "remote_write", "remote_apply"):
                configured = "on"
            self._begin = f"{_BEGIN_LAZY}; SET LOCAL synchronous_commit = {configured}"
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.pool_size,
                                                   command_timeout=self.timeout, timeout=self.timeout,
                                                   reset=_kept_as_is, server_settings=_LAZY_CONNECTIONS)
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(f"SET LOCAL synchronous_commit = {configured}")
                await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                await conn.execute(SCHEMA)
                if await conn.fetchval("SELECT COUNT(*) FROM schema_version") == 0:
                    await conn.execute("INSERT INTO schema_version(version) VALUES ($1)", SCHEMA_VERSION)
                if await conn.fetchval("SELECT COUNT(*) FROM auth_version") == 0:
                    await conn.execute("INSERT INTO auth_version(version) VALUES (0)")
        except CONNECTION_ERRORS as e:
            await self.close()
            raise RuntimeError(f"cannot open the database {_without_password(self.url)}: {e}") from e
        logger.info("datastore: PostgreSQL at %s", _without_password(self.url))

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (asyncio.TimeoutError, *CONNECTION_ERRORS):
                pool.terminate()

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "PostgresDatastore.open() first"
        return self._pool

    async def read(self, script: Script[T]) -> T:
        return await self._run(script, readonly=True)

    async def write(self, script: Script[T], durable: bool = True) -> T:
        return await self._run(script, durable=durable)

    async def _run(self, script: Script[T], readonly: bool = False, durable: bool = True) -> T:
        """``script`` in one transaction, begun (with its settings) in one round trip and
        committed in another: asyncpg's transaction manager took two to begin a transaction that
        need not wait for the disk, and the pool a third to reset each connection it got back."""
        try:
            async with self.pool.acquire(timeout=self.timeout) as conn:
                if (readonly or not durable) and sql.is_one_statement(script):
                    # one statement: one snapshot, all or nothing, and (the connection's
                    # setting) a commit that does not wait for the disk
                    return await sql.run_async(script, functools.partial(_execute, conn))
                await conn.execute(_BEGIN_READ if readonly else self._begin if durable else _BEGIN_LAZY)
                try:
                    outcome = await sql.run_async(script, functools.partial(_execute, conn))
                except BaseException:
                    if not conn.is_closed():  # (a broken one is dropped by the pool)
                        with contextlib.suppress(Exception):
                            await asyncio.shield(conn.execute("ROLLBACK"))
                    raise
                await conn.execute("COMMIT")
                return outcome
        except CONNECTION_ERRORS as e:
            raise unavailable(e) from e
        except RETRYABLE_ERRORS as e:
            raise Unavailable(f"the database aborted this change to let another through ({type(e).__name__});"
                              " try again") from e

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> int | None:
        """Take or renew the lease ``name`` for ``ttl`` seconds (the database's clock, so the
        servers' clocks do not matter): its term if ``holder`` has it now, else None. A
        holder that keeps it keeps its term; each new holder gets the next one."""
        def take() -> Script[int | None]:
            return (yield sql.q(
                "INSERT INTO leases(name, holder, term, expires_at)"
                " VALUES (?, ?, 1, EXTRACT(EPOCH FROM clock_timestamp()) + ?)"
                " ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at,"
                " term = CASE WHEN leases.holder = EXCLUDED.holder THEN leases.term ELSE leases.term + 1 END"
                " WHERE leases.holder = EXCLUDED.holder OR leases.expires_at < EXTRACT(EPOCH FROM clock_timestamp())"
                " RETURNING term", name, holder, float(ttl))).scalar()

        return await self.write(take())

    async def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up at once (a clean stop), so a standby need not wait for it to expire."""
        await self.write(_release(name, holder))

    async def lease_holder(self, name: str) -> str | None:
        """Who holds the lease now (None if nobody, or it expired)."""
        return await self.read(_holder(name))

    def space(self) -> tuple[int, int] | None:
        return None  # the database server's own business

    async def data_version(self) -> int:
        """Changes whenever users or revocations change, from any server."""
        return await self.read(_auth_version())

    async def listen_jobs(self, on_job: Callable[[int, Job | None], None]) -> _Listener:
        """Call ``on_job(id, job)`` for each job inserted from now on, until the listener is
        closed: ``job`` as the notification carried it (None: read it by its id). The connection
        is dedicated (a pooled one would be handed to others)."""
        conn = await asyncpg.connect(self.url, timeout=self.timeout)

        def notified(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            heard = announced(payload)
            if heard is not None:
                on_job(*heard)

        await conn.add_listener(JOBS_CHANNEL, notified)
        return _Listener(conn)


def announced(payload: str) -> tuple[int, Job | None] | None:
    """A ``dpip_jobs`` notification: (the job's id, the job if it came whole), or None if it
    says nothing usable (the sweep for queued jobs finds whatever such a one was about)."""
    if payload.isdigit():
        return int(payload), None
    try:
        row = json.loads(payload)
        if not (isinstance(row, list) and len(row) == 13 and isinstance(row[0], int) and row[0] >= 0):
            return None
        return row[0], jobrows.job_of(row)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return None


class _Listener:
    """A connection listening for ``dpip_jobs`` (a :class:`~storage.datastore.JobListener`)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    def is_closed(self) -> bool:
        return self._conn.is_closed()

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._conn.close(), 5)
        except (asyncio.TimeoutError, *CONNECTION_ERRORS):
            self._conn.terminate()


def _release(name: str, holder: str) -> Script[None]:
    yield sql.q("UPDATE leases SET expires_at = 0 WHERE name = ? AND holder = ?", name, holder)


def _holder(name: str) -> Script[str | None]:
    return (yield sql.q("SELECT holder FROM leases WHERE name = ?"
                        " AND expires_at >= EXTRACT(EPOCH FROM clock_timestamp())", name)).scalar()


def _auth_version() -> Script[int]:
    return (yield sql.q("SELECT version FROM auth_version")).scalar()


def _without_password(url: str) -> str:
    """The URL as it may be logged."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in creds else url
