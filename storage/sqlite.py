"""The SQLite datastore: one file with users, tokens, workloads, images, jobs, workers.

Every query is a script of :mod:`storage.queries` (written once for every engine); this
module runs them on SQLite. Writes go through :class:`GroupCommit`: one connection in its own
thread, where every transaction waiting at that moment runs in one ``BEGIN ... COMMIT`` (each
in a savepoint, so one failing rolls back alone): one trip to the thread and one fsync for the
whole group. Reads go through :class:`Reader`: another connection in another thread, a whole
script in one trip, seeing committed data only (WAL lets it read while a group commits).
Opening (schema, migrations) uses aiosqlite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from common.models import InsufficientStorage
from storage import schema, sql
from storage.queries import DEFAULT_PAGE, MAX_PAGE, SqlDatastore, stored_tags
from storage.groupwrite import FileWrite
from storage.sql import Result, Script, Statement, UniqueViolation

__all__ = ["DEFAULT_PAGE", "MAX_PAGE", "GroupCommit", "Reader", "SqliteDatastore", "stored_tags"]

logger = logging.getLogger(__name__)

#: Every table and index (:mod:`storage.schema`), then the counters' triggers: the workloads'
#: counters follow their images and jobs inside the very statement that changes them, so a
#: transition stays one statement and no code path can forget a counter.
SCHEMA = schema.create_all(schema.SQLITE)
COUNTERS = f"""
DROP TRIGGER IF EXISTS images_counted;
DROP TRIGGER IF EXISTS images_counted_v2;
CREATE TRIGGER images_counted_v2 AFTER INSERT ON images BEGIN
    UPDATE workloads SET {schema.images_counted(schema.SQLITE)} WHERE id = NEW.workload_id;
END;
DROP TRIGGER IF EXISTS jobs_counted;
CREATE TRIGGER jobs_counted AFTER UPDATE OF state ON jobs WHEN OLD.state != NEW.state BEGIN
    UPDATE workloads SET {schema.jobs_counted(schema.SQLITE)} WHERE id = NEW.workload_id;
END;
"""


T = TypeVar("T")
#: At most this many transactions share one commit (a bound on a group's latency).
MAX_GROUP = 256


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before we answer 2xx
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def _executor(conn: sqlite3.Connection) -> Callable[[Statement], Result]:
    def execute(statement: Statement) -> Result:
        try:
            cur = conn.execute(statement.sql, statement.params)
        except sqlite3.IntegrityError as e:
            if "UNIQUE" not in str(e):
                raise
            raise UniqueViolation(str(e)) from e
        rows = cur.fetchall()  # a statement ends here: none is left open across an await
        return Result(rows, len(rows) if cur.rowcount < 0 else cur.rowcount)
    return execute


class Reader:
    """Read-only scripts on their own connection and thread, each in one trip."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sqlite-read")
        self._conn: sqlite3.Connection | None = None
        self._execute: Callable[[Statement], Result] | None = None

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._open)

    def _open(self) -> None:
        self._conn = _connect(self._path)
        self._execute = _executor(self._conn)

    async def run(self, script: Script[T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, script)

    def _run(self, script: Script[T]) -> T:
        assert self._conn is not None and self._execute is not None
        self._conn.execute("BEGIN")  # one snapshot for the whole script
        try:
            return sql.run(script, self._execute)
        finally:
            self._conn.execute("COMMIT")

    async def close(self) -> None:
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._conn.close)
            self._conn = None
        self._pool.shutdown(wait=True)


class GroupCommit:
    """Transactions (scripts) run in a dedicated thread; those that arrive while a group is
    being committed form the next group. Each is all or nothing (a savepoint), and its caller
    hears back only once the group's COMMIT is on disk (or committed, for a group of which
    none needs to be durable)."""

    def __init__(self, path: Path) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sqlite-group")
        self._conn: sqlite3.Connection | None = None
        self._execute: Callable[[Statement], Result] | None = None
        self._path = path
        self._waiting: list[tuple[Script[Any], asyncio.Future, bool, Sequence[FileWrite]]] = []
        self._synchronous = "FULL"
        self._flusher: asyncio.Task | None = None
        self.groups = self.transactions = self.lazy_groups = 0  # for the curious (and the tests)

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._open)

    def _open(self) -> None:
        self._conn = _connect(self._path)
        self._execute = _executor(self._conn)

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.wait([self._flusher])
        if self.groups:
            logger.info("group commit: %d transactions in %d commits (%d of them not synced)",
                        self.transactions, self.groups, self.lazy_groups)
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._conn.close)
            self._conn = None
        self._pool.shutdown(wait=True)

    async def run(self, script: Script[T], durable: bool = True, files: Sequence[FileWrite] = ()) -> T:
        """Run ``script`` with others; its result once committed, and on disk unless it is not
        ``durable`` (see :meth:`SqliteDatastore.write`). ``files`` are written in the same trip
        to the thread, just before the group's transaction (a file's error is the script's,
        and the script does not run)."""
        return await self.queue(script, durable, files)

    def queue(self, script: Script[T], durable: bool = True, files: Sequence[FileWrite] = ()) -> asyncio.Future[T]:
        """:meth:`run`, in line now: every script queued after this one (from this loop) is
        applied after it; the future of its outcome."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting.append((script, future, durable, files))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="group-commit")
        return future

    async def _flush(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
                outcomes = await self._commit([t for t, _, _, _ in group], any(d for _, _, d, _ in group),
                                              [f for _, _, _, f in group])
                for (_, future, _, _), (ok, value) in zip(group, outcomes, strict=True):
                    if future.done():
                        continue  # its caller was cancelled; the write stands (or not) regardless
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._flusher = None
            for _, future, _, _ in self._waiting:  # only if we were stopped: nobody is left hanging
                if not future.done():
                    future.set_exception(RuntimeError("the datastore is closing"))

    async def _commit(self, scripts: list[Script[Any]], durable: bool,
                      files: list[Sequence[FileWrite]]) -> list[tuple[bool, Any]]:
        """Each transaction's (ok, result or exception); all fail if the COMMIT does."""
        self.groups += 1
        self.transactions += len(scripts)
        self.lazy_groups += not durable
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._apply, scripts, durable, files)
        except Exception as e:  # the group as a whole failed (disk full, I/O error...)
            return [(False, _full_disk(e) or e)] * len(scripts)
        return [(ok, value if ok else (_full_disk(value) or value)) for ok, value in outcomes]

    def _apply(self, scripts: list[Script[Any]], durable: bool,
               files: list[Sequence[FileWrite]]) -> list[tuple[bool, Any]]:
        """In the thread: the group's files first (each writer's in one group: a directory
        synced once), then one BEGIN ... COMMIT around a savepoint per transaction whose files
        are in place; the COMMIT waits for the disk (an fsync of the WAL) only if one of them
        must be durable."""
        conn, execute = self._conn, self._execute
        assert conn is not None and execute is not None
        failed = _write_files(files)
        synchronous = "FULL" if durable else "NORMAL"  # NORMAL: the WAL is synced by a later commit
        if synchronous != self._synchronous:
            conn.execute(f"PRAGMA synchronous={synchronous}")
            self._synchronous = synchronous
        conn.execute("BEGIN IMMEDIATE")
        outcomes: list[tuple[bool, Any]] = []
        try:
            for i, script in enumerate(scripts):
                if i in failed:
                    outcomes.append((False, failed[i]))
                    continue
                conn.execute("SAVEPOINT one")
                try:
                    outcomes.append((True, sql.run(script, execute)))
                except Exception as e:
                    conn.execute("ROLLBACK TO one")
                    outcomes.append((False, e))
                conn.execute("RELEASE one")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes


def _write_files(files: list[Sequence[FileWrite]]) -> dict[int, BaseException]:
    """In the group's thread: every transaction's files, one group per writer; the first error
    of each transaction whose files could not all be written."""
    by_writer: dict[int, list[tuple[int, FileWrite]]] = {}
    for i, some in enumerate(files):
        for f in some:
            by_writer.setdefault(id(f.writer), []).append((i, f))
    failed: dict[int, BaseException] = {}
    for pairs in by_writer.values():
        group = [f for _, f in pairs]
        for (i, _), outcome in zip(pairs, group[0].writer.write_now(group), strict=True):
            if isinstance(outcome, BaseException):
                failed.setdefault(i, outcome)
    return failed


class SqliteDatastore(SqlDatastore):
    """The datastore on one SQLite file (one server: nobody else schedules on it)."""

    shared = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None  # opening and migrations only
        self._group = GroupCommit(path)
        self._reader = Reader(path)
        self._last_job_id = 0  # the last job id given out (reserve_job_id)
        self._reserved_to = 0  # ... and the last of the block written down for it
        self._refill: asyncio.Task | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        """The connection that opened the file (schema, migrations, checks)."""
        assert self._db is not None, "SqliteDatastore.open() first"
        return self._db

    async def read(self, script: Script[T]) -> T:
        return await self._reader.run(script)

    async def write(self, script: Script[T], durable: bool = True) -> T:
        """Run ``script`` all or nothing, committed together with the others that are waiting:
        the path of every write. Its result once it is on disk; or, if it need not be
        ``durable`` (a crash losing it loses nothing: recovery redoes it), once it is committed,
        to be synced by the next durable commit (never out of order: one WAL)."""
        return await self._group.run(script, durable)

    async def write_with_files(self, script: Script[T], files: Sequence[FileWrite], durable: bool = True) -> T:
        """The files, then the script, in one trip to the group's thread (see the base class)."""
        return await self._group.run(script, durable, files)

    def write_queued(self, script: Script[T], files: Sequence[FileWrite] = (), durable: bool = True) -> asyncio.Future[T]:
        """:meth:`write_with_files`, in line at once: any write asked for after this call is
        applied after it (one writer thread, in order). The future of its outcome."""
        return self._group.queue(script, durable, files)

    def reserve_job_id(self) -> int | None:
        """The id of a job row to be inserted (:func:`storage.jobrows.enqueue`), known before
        its transaction runs, or None (then the row takes the next one itself). Ids come from a
        block written down first (the jobs' AUTOINCREMENT counter moved past it, synced), so
        that no id given out is ever given again, not even after a crash that lost the rows
        of some: a result still on its way for one of those can never be taken for another
        job's. A block used up is replaced in the background (ids are None meanwhile)."""
        if self._last_job_id < self._reserved_to:
            self._last_job_id += 1
            return self._last_job_id
        if self._refill is None:
            self._refill = asyncio.ensure_future(self._next_block())
        return None

    async def _next_block(self) -> None:
        try:
            end = await self.write(_job_id_block(JOB_ID_BLOCK))
            self._last_job_id = max(self._last_job_id, end - JOB_ID_BLOCK)
            self._reserved_to = end
        except Exception as e:  # (tried again at the next upload; rows take their own ids meanwhile)
            logger.warning("could not set job ids aside: %s", e)
        finally:
            self._refill = None

    async def open(self) -> None:
        # isolation_level=None: no implicit BEGIN; transactions are explicit.
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        self._db.row_factory = aiosqlite.Row
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=FULL")
        await self._db.execute("PRAGMA foreign_keys=ON")
        await self._db.execute("PRAGMA busy_timeout=5000")
        await self._db.executescript(SCHEMA)
        await self._migrate()
        await self._db.executescript(COUNTERS)
        await self._group.open()
        await self._reader.open()
        await self._next_block()  # (the first job ids, set aside)

    async def close(self) -> None:
        if self._refill is not None:  # (a block being set aside: done before the writer closes)
            await asyncio.wait([self._refill])
        await self._group.close()
        await self._reader.close()
        if self._db is not None:
            await self._db.close()
            self._db = None

    def space(self) -> tuple[int, int] | None:
        """(free, total) bytes on the datastore's disk."""
        try:
            usage = shutil.disk_usage(self.path.parent)
        except OSError:
            return None
        return usage.free, usage.total

    async def data_version(self) -> int:
        """Changes when another connection (another process, or our writer) commits."""
        return await self.read(_data_version())

    async def _migrate(self) -> None:
        """Add the columns later versions introduced to a data dir made by an earlier one."""
        columns = await self._columns("workloads")
        if "dir" not in columns:  # rebuilt with every later column, the counters to be counted
            if "meta" not in columns:
                async with self._transaction() as db:
                    await db.execute("ALTER TABLE workloads ADD COLUMN "
                                     + schema.TABLE["workloads"].column("meta").ddl(schema.SQLITE))
            await self._rebuild_workloads()
        else:
            async with self._transaction() as db:
                for statement in schema.added_columns(schema.SQLITE, "workloads", columns):
                    await db.execute(statement)
        if not {"image_count", "bytes"} <= columns:  # counters came later: count what is there once
            async with self._transaction() as db:
                await db.execute(schema.recount())
        async with self._transaction() as db:
            for statement in schema.added_columns(schema.SQLITE, "images", await self._columns("images")):
                await db.execute(statement)

    async def _columns(self, table: str) -> set[str]:
        async with self.db.execute(f"PRAGMA table_info({table})") as cur:
            return {r["name"] for r in await cur.fetchall()}

    async def _rebuild_workloads(self) -> None:
        """Names were unique across owners and were their directories: keep each as its ``dir``
        and make names unique per owner. SQLite cannot drop a UNIQUE constraint, so the table is
        rebuilt (its documented 12 steps: foreign keys off, copy, drop, rename, check)."""
        db = self.db
        await db.execute("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction: hence here
        try:
            await db.executescript(
                "BEGIN;"
                + schema.TABLE["workloads"].ddl(schema.SQLITE, "workloads_v2")
                + "INSERT INTO workloads_v2(id, name, dir, owner, filter, tags, created_at, next_image_id,"
                " meta) SELECT id, name, name, owner, filter, tags, created_at, next_image_id, meta"
                " FROM workloads;"
                " DROP TABLE workloads;"
                " ALTER TABLE workloads_v2 RENAME TO workloads;"
                " COMMIT;"
            )
            async with db.execute("PRAGMA foreign_key_check") as cur:
                broken = await cur.fetchall()
            if broken:
                raise RuntimeError(f"datastore migration left {len(broken)} dangling references")
        finally:
            await db.execute("PRAGMA foreign_keys=ON")
        logger.info("datastore migrated: workload names are now unique per user")

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A migration step: BEGIN IMMEDIATE ... COMMIT on the opening connection (before the
        writer thread exists), ROLLBACK on any error."""
        db = self.db
        await db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            await db.rollback()
            raise
        await db.execute("COMMIT")


def _full_disk(e: object) -> InsufficientStorage | None:
    """SQLite's "database or disk is full" as the 507 it is."""
    if isinstance(e, sqlite3.OperationalError) and "full" in str(e):
        error = InsufficientStorage("no space left on the server's disk for the datastore: free some space"
                                    " (e.g. delete a workload) and try again")
        error.__cause__ = e
        return error
    return None


#: Job ids set aside at a time (reserve_job_id): what a crash may skip.
JOB_ID_BLOCK = 1024


def _job_id_block(n: int) -> Script[int]:
    """The jobs' AUTOINCREMENT counter moved ``n`` past every id used so far: the end of a block
    of ``n`` ids no row takes by itself."""
    used = (yield sql.q("SELECT MAX(COALESCE((SELECT MAX(seq) FROM sqlite_sequence WHERE name = 'jobs'), 0),"
                        " COALESCE((SELECT MAX(id) FROM jobs), 0))")).scalar()
    if (yield sql.q("UPDATE sqlite_sequence SET seq = ? WHERE name = 'jobs'", used + n)).rowcount == 0:
        yield sql.q("INSERT INTO sqlite_sequence(name, seq) VALUES ('jobs', ?)", used + n)
    return used + n


def _data_version() -> Script[int]:
    return (yield sql.q("PRAGMA data_version")).scalar()
