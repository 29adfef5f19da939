"""The datastore: one SQLite file (aiosqlite) with users, tokens, workloads, images, jobs, workers.

Reads and the occasional write go through one aiosqlite connection. The per-image writes (the
job transitions of :mod:`controller.jobs`, image ids) go through :class:`GroupCommit`: its own
connection in its own thread, where every transaction waiting at that moment runs in one
``BEGIN ... COMMIT`` (each in a savepoint, so one failing rolls back alone): one trip to the
thread and one fsync for the whole group instead of four or five trips each, all holding the
write lock. Both connections write only under that one lock, so SQLite's single-writer rule never
surprises us; WAL lets readers proceed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from controller.models import (
    Conflict,
    Filter,
    ImageType,
    JobState,
    NotFound,
    Workload,
    WorkloadView,
    quoted,
)

logger = logging.getLogger(__name__)

#: Names are unique per owner; ``dir`` (the images directory) is unique across owners.
WORKLOADS_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    dir TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    filter TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    next_image_id INTEGER NOT NULL DEFAULT 0,
    meta TEXT NOT NULL DEFAULT '{{}}',
    params TEXT NOT NULL DEFAULT '{{}}',
    -- kept by the triggers below, so that a workload's status costs one row, not its history
    image_count INTEGER NOT NULL DEFAULT 0,
    filtered_count INTEGER NOT NULL DEFAULT 0,
    failed_count INTEGER NOT NULL DEFAULT 0,
    running_count INTEGER NOT NULL DEFAULT 0,
    started INTEGER NOT NULL DEFAULT 0,
    UNIQUE (owner, name)
);
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
""" + WORKLOADS_TABLE.format(table="workloads") + """
CREATE TABLE IF NOT EXISTS images (
    workload_id TEXT NOT NULL REFERENCES workloads(id),
    image_id INTEGER NOT NULL,
    type TEXT NOT NULL,
    format TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    width INTEGER,  -- from the header at upload (NULL in rows of earlier versions)
    height INTEGER,
    mode TEXT,
    PRIMARY KEY (workload_id, type, image_id)
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    workload_id TEXT NOT NULL REFERENCES workloads(id),
    image_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    dispatched_at REAL,
    deadline REAL,
    finished_at REAL,
    copies INTEGER NOT NULL DEFAULT 0,
    download_ms REAL,
    process_ms REAL,
    upload_ms REAL,
    UNIQUE (workload_id, image_id)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS workloads_owner ON workloads(owner, created_at);
CREATE TABLE IF NOT EXISTS workers (
    name TEXT PRIMARY KEY,
    tags TEXT NOT NULL,
    rpc_address TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
"""


#: The workloads' counters follow their images and jobs inside the very statement that changes
#: them: a transition stays one statement, and no code path can forget a counter.
COUNTERS = """
CREATE TRIGGER IF NOT EXISTS images_counted AFTER INSERT ON images BEGIN
    UPDATE workloads SET image_count = image_count + (NEW.type = 'original'),
                         filtered_count = filtered_count + (NEW.type = 'filtered')
    WHERE id = NEW.workload_id;
END;
CREATE TRIGGER IF NOT EXISTS jobs_counted AFTER UPDATE OF state ON jobs WHEN OLD.state != NEW.state BEGIN
    UPDATE workloads SET running_count = running_count + (NEW.state = 'dispatched') - (OLD.state = 'dispatched'),
                         failed_count = failed_count + (NEW.state = 'failed') - (OLD.state = 'failed'),
                         started = started OR NEW.state = 'dispatched'
    WHERE id = NEW.workload_id;
END;
"""

RECOUNT = """
UPDATE workloads SET
    image_count = (SELECT COUNT(*) FROM images i WHERE i.workload_id = workloads.id AND i.type = 'original'),
    filtered_count = (SELECT COUNT(*) FROM images i WHERE i.workload_id = workloads.id AND i.type = 'filtered'),
    failed_count = (SELECT COUNT(*) FROM jobs j WHERE j.workload_id = workloads.id AND j.state = 'failed'),
    running_count = (SELECT COUNT(*) FROM jobs j WHERE j.workload_id = workloads.id AND j.state = 'dispatched'),
    started = EXISTS (SELECT 1 FROM jobs j WHERE j.workload_id = workloads.id AND j.attempts > 0)
"""

#: A page of GET /workloads at most, and by default.
MAX_PAGE = 1000
DEFAULT_PAGE = 100


def tags_of(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


def _workload(row: aiosqlite.Row) -> Workload:
    return Workload(
        row["id"], row["name"], row["owner"], Filter(row["filter"]), tags_of(row["tags"]),
        row["created_at"], json.loads(row["meta"]), row["dir"], json.loads(row["params"]),
    )


class _Rows:
    """The rows of a finished statement, read like an aiosqlite cursor."""

    def __init__(self, rows: list) -> None:
        self._rows = rows

    async def fetchone(self):
        return self._rows[0] if self._rows else None

    async def fetchall(self) -> list:
        return self._rows

    async def __aenter__(self) -> _Rows:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Pending:
    """``db.execute(...)``: awaitable, or used with ``async with`` like aiosqlite's."""

    def __init__(self, coro) -> None:
        self._coro = coro

    def __await__(self):
        return self._coro.__await__()

    async def __aenter__(self):
        return await self._coro

    async def __aexit__(self, *exc: object) -> None:
        return None


class _OneHop:
    """The shared connection, with every query run to its end in one trip to SQLite's thread.

    All coroutines share one connection. A SELECT left open across an ``await`` (execute, then
    fetch, then close: three trips) makes any other coroutine's ``commit()`` in between fail
    with "cannot commit transaction - SQL statements in progress". Queries that return rows
    go through ``execute_fetchall`` (one trip); other statements finish inside ``execute``."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    def execute(self, sql: str, params: tuple | list = ()) -> _Pending:
        head = sql.lstrip()[:6].upper()
        if head in ("SELECT", "PRAGMA") or " RETURNING " in sql.upper():
            return _Pending(self._fetch(sql, params))
        return _Pending(self._db.execute(sql, params))

    async def _fetch(self, sql: str, params: tuple | list) -> _Rows:
        return _Rows(list(await self._db.execute_fetchall(sql, params)))

    def __getattr__(self, name: str):
        return getattr(self._db, name)


T = TypeVar("T")
#: At most this many transactions share one commit (a bound on a group's latency).
MAX_GROUP = 256


class GroupCommit:
    """Transactions as plain functions of a ``sqlite3.Connection``, run in a dedicated thread;
    those that arrive while a group is being committed form the next group. Each is all or
    nothing (a savepoint), and its caller hears back only once the group's COMMIT is on disk."""

    def __init__(self, path: Path, lock: asyncio.Lock) -> None:
        self._lock = lock
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sqlite-group")
        self._conn: sqlite3.Connection | None = None
        self._path = path
        self._waiting: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future, bool]] = []
        self._synchronous = "FULL"
        self._flusher: asyncio.Task | None = None
        self.groups = self.transactions = self.lazy_groups = 0  # for the curious (and the tests)

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._connect)

    def _connect(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        self._conn = conn

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

    async def run(self, transaction: Callable[[sqlite3.Connection], T], durable: bool = True) -> T:
        """Run ``transaction`` (which must not commit) with others; its result once committed,
        and on disk unless it is not ``durable`` (see :meth:`Store.grouped`)."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((transaction, future, durable))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="group-commit")
        return await future

    async def _flush(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
                outcomes = await self._commit([t for t, _, _ in group], any(d for _, _, d in group))
                for (_, future, _), (ok, value) in zip(group, outcomes, strict=True):
                    if future.done():
                        continue  # its caller was cancelled; the write stands (or not) regardless
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._flusher = None
            for _, future, _ in self._waiting:  # only if we were stopped: nobody is left hanging
                if not future.done():
                    future.set_exception(RuntimeError("the datastore is closing"))

    async def _commit(self, transactions: list[Callable[[sqlite3.Connection], Any]],
                      durable: bool) -> list[tuple[bool, Any]]:
        """Each transaction's (ok, result or exception); all fail if the COMMIT does."""
        self.groups += 1
        self.transactions += len(transactions)
        self.lazy_groups += not durable
        try:
            async with self._lock:
                return await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._apply, transactions, durable)
        except Exception as e:  # the group as a whole failed (disk full, I/O error...)
            return [(False, e)] * len(transactions)

    def _apply(self, transactions: list[Callable[[sqlite3.Connection], Any]],
               durable: bool) -> list[tuple[bool, Any]]:
        """In the thread: one BEGIN ... COMMIT around a savepoint per transaction; the COMMIT
        waits for the disk (an fsync of the WAL) only if one of them must be durable."""
        conn = self._conn
        assert conn is not None
        synchronous = "FULL" if durable else "NORMAL"  # NORMAL: the WAL is synced by a later commit
        if synchronous != self._synchronous:
            conn.execute(f"PRAGMA synchronous={synchronous}")
            self._synchronous = synchronous
        conn.execute("BEGIN IMMEDIATE")
        outcomes: list[tuple[bool, Any]] = []
        try:
            for transaction in transactions:
                conn.execute("SAVEPOINT one")
                try:
                    outcomes.append((True, transaction(conn)))
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


class Store:
    """Async access to the SQLite datastore."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._group = GroupCommit(path, self._write_lock)

    @property
    def db(self) -> _OneHop:
        assert self._db is not None, "Store.open() first"
        return _OneHop(self._db)

    async def write(self, sql: str, params: tuple | list = ()) -> aiosqlite.Cursor:
        """One statement as its own transaction (autocommit), under the write lock: what
        :meth:`transaction` gives a single statement, in one trip to SQLite's thread, not three."""
        async with self._write_lock:
            return await self.db.execute(sql, params)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[_OneHop]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any error.

        Every coroutine shares one connection, so writes are serialized by a lock: without it
        one coroutine's COMMIT would commit another's half-done transaction. So every write must
        come through here: on this shared connection a write made outside, while a transaction
        is open, would join that transaction. Reads need no lock (they may see the rows of a
        transaction still open on this connection; SQLite's other connections never do)."""
        async with self._write_lock:
            db = self.db
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                await self._db.rollback()  # type: ignore[union-attr]
                raise
            await db.execute("COMMIT")

    async def open(self) -> None:
        # isolation_level=None: no implicit BEGIN; transactions are ours (transaction()).
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        self._db.row_factory = aiosqlite.Row
        await self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before we answer 2xx, power loss included.
        await self._db.execute("PRAGMA synchronous=FULL")
        await self._db.execute("PRAGMA foreign_keys=ON")
        await self._db.execute("PRAGMA busy_timeout=5000")
        await self._db.executescript(SCHEMA)
        await self._migrate()
        await self._db.executescript(COUNTERS)
        await self._group.open()

    async def _migrate(self) -> None:
        """Add the columns later versions introduced to a data dir made by an earlier one."""
        async with self.db.execute("PRAGMA table_info(workloads)") as cur:
            columns = {r["name"] for r in await cur.fetchall()}
        if "meta" not in columns:
            async with self.transaction() as db:
                await db.execute("ALTER TABLE workloads ADD COLUMN meta TEXT NOT NULL DEFAULT '{}'")
        if "dir" not in columns:
            await self._rebuild_workloads()  # with every later column too
        elif "params" not in columns:
            async with self.transaction() as db:
                await db.execute("ALTER TABLE workloads ADD COLUMN params TEXT NOT NULL DEFAULT '{}'")
        if "image_count" not in columns:  # counters came later: count what is there once
            async with self.transaction() as db:
                if "dir" in columns:  # (a rebuilt table has them already)
                    for column in ("image_count", "filtered_count", "failed_count", "running_count", "started"):
                        await db.execute(f"ALTER TABLE workloads ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
                await db.execute(RECOUNT)
        async with self.db.execute("PRAGMA table_info(images)") as cur:
            if "width" not in {r["name"] for r in await cur.fetchall()}:
                async with self.transaction() as db:
                    for column in ("width INTEGER", "height INTEGER", "mode TEXT"):
                        await db.execute(f"ALTER TABLE images ADD COLUMN {column}")

    async def _rebuild_workloads(self) -> None:
        """Names were unique across owners and were their directories: keep each as its ``dir``
        and make names unique per owner. SQLite cannot drop a UNIQUE constraint, so the table is
        rebuilt (its documented 12 steps: foreign keys off, copy, drop, rename, check)."""
        db = self.db
        await db.execute("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction: hence here
        try:
            await db.executescript(
                "BEGIN;"
                + WORKLOADS_TABLE.format(table="workloads_v2")
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

    async def close(self) -> None:
        await self._group.close()
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def grouped(self, transaction: Callable[[sqlite3.Connection], T], durable: bool = True) -> T:
        """Run ``transaction`` (a function of a plain ``sqlite3.Connection``; it must not
        commit) all or nothing, committed together with the others that are waiting: the path
        of every per-image write. Its result once it is on disk; or, if it need not be
        ``durable`` (a crash losing it loses nothing: recovery redoes it), once it is committed,
        to be synced by the next durable commit (never out of order: one WAL)."""
        return await self._group.run(transaction, durable)

    # -- users and tokens -------------------------------------------------------------------

    async def count_users(self) -> int:
        async with self.db.execute("SELECT COUNT(*) FROM users") as cur:
            return (await cur.fetchone())[0]

    async def add_user(self, name: str, password_hash: str) -> float:
        """Add a user; returns its ``created_at`` (tokens issued before it are not its own)."""
        now = time.time()
        try:
            async with self.transaction() as db:
                await db.execute(
                    "INSERT INTO users(name, password_hash, created_at) VALUES (?, ?, ?)",
                    (name, password_hash, now),
                )
        except aiosqlite.IntegrityError as e:
            raise Conflict(f"user {quoted(name)} exists") from e
        return now

    async def list_users(self) -> list[tuple[str, float]]:
        async with self.db.execute("SELECT name, created_at FROM users ORDER BY name") as cur:
            return [(r[0], r[1]) for r in await cur.fetchall()]

    async def remove_user(self, name: str) -> bool:
        """Delete the user; their workloads stay, re-owned in the same transaction by a name no
        login can have (``:`` is not allowed in user names), so a new account of the same name
        does not inherit them."""
        async with self.transaction() as db:
            cur = await db.execute("DELETE FROM users WHERE name = ?", (name,))
            if cur.rowcount == 1:
                tomb = f"removed:{name}:{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}:{uuid.uuid4().hex[:8]}"
                await db.execute("UPDATE workloads SET owner = ? WHERE owner = ?", (tomb, name))
        return cur.rowcount == 1

    async def user(self, name: str) -> tuple[str, float] | None:
        """``(password_hash, created_at)`` of a user, or None."""
        async with self.db.execute(
            "SELECT password_hash, created_at FROM users WHERE name = ?", (name,)
        ) as cur:
            row = await cur.fetchone()
        return (row[0], row[1]) if row else None

    async def data_version(self) -> int:
        """Changes when another connection (another process) commits to the file."""
        async with self.db.execute("PRAGMA data_version") as cur:
            return (await cur.fetchone())[0]

    async def password_hash(self, name: str) -> str | None:
        async with self.db.execute("SELECT password_hash FROM users WHERE name = ?", (name,)) as cur:
            row = await cur.fetchone()
        return row[0] if row else None

    async def revoke_token(self, jti: str, expires_at: float) -> None:
        async with self.transaction() as db:
            await db.execute(
                "INSERT OR IGNORE INTO revoked_tokens(jti, expires_at) VALUES (?, ?)", (jti, expires_at)
            )
            await db.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (time.time(),))

    async def revoked_tokens(self) -> set[str]:
        async with self.db.execute(
            "SELECT jti FROM revoked_tokens WHERE expires_at >= ?", (time.time(),)
        ) as cur:
            return {r[0] for r in await cur.fetchall()}

    # -- workloads --------------------------------------------------------------------------

    async def create_workload(
        self, name: str | None, owner: str, filter: Filter, tags: tuple[str, ...],
        meta: dict | None = None, params: dict | None = None,
    ) -> Workload:
        """A new workload; ``params`` are its filter's, already validated."""
        wid = str(uuid.uuid4())
        name = name or f"workload-{wid[:8]}"
        now = time.time()
        meta, params = meta or {}, params or {}
        try:
            # Its directory is its name unless another user's workload has that one already:
            # chosen in the statement itself, so two creations at once cannot both take it.
            async with self.transaction() as db, db.execute(
                "INSERT INTO workloads(id, name, dir, owner, filter, tags, created_at, meta, params)"
                " SELECT ?, ?, CASE WHEN EXISTS (SELECT 1 FROM workloads WHERE dir = ?)"
                " THEN ? ELSE ? END, ?, ?, ?, ?, ?, ? RETURNING dir",
                (wid, name, name, f"{name}.{wid[:8]}", name, owner, filter.value, ",".join(tags), now,
                 json.dumps(meta), json.dumps(params)),
            ) as cur:
                (dir_,) = await cur.fetchone()
        except aiosqlite.IntegrityError as e:
            raise Conflict(f"workload_name {quoted(name)} is already in use (by one of yours)") from e
        return Workload(wid, name, owner, filter, tags, now, meta, dir_, params)

    async def get_workload(self, workload_id: str, owner: str | None = None) -> Workload:
        """The workload, or :class:`NotFound` (also when ``owner`` is given and differs)."""
        async with self.db.execute("SELECT * FROM workloads WHERE id = ?", (workload_id,)) as cur:
            row = await cur.fetchone()
        if row is None or (owner is not None and row["owner"] != owner):
            raise NotFound(f"workload {quoted(workload_id)} not found")
        return _workload(row)

    async def workloads(self, owner: str) -> list[Workload]:
        """The owner's workloads, oldest first."""
        async with self.db.execute(
            "SELECT * FROM workloads WHERE owner = ? ORDER BY created_at", (owner,)
        ) as cur:
            return [_workload(r) for r in await cur.fetchall()]

    async def workload_view(self, workload: Workload) -> WorkloadView:
        async with self.db.execute("SELECT * FROM workloads WHERE id = ?", (workload.id,)) as cur:
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"workload {quoted(workload.id)} not found")
        return (await self._views([row]))[0]

    async def active_views(self, owner: str) -> list[WorkloadView]:
        """The owner's workloads not completed, oldest first: one indexed query and the lists of
        those few, whatever the owner's history."""
        async with self.db.execute(
            "SELECT * FROM workloads WHERE owner = ?"
            " AND NOT (image_count > 0 AND filtered_count + failed_count >= image_count) ORDER BY created_at",
            (owner,),
        ) as cur:
            rows = await cur.fetchall()
        return await self._views(rows)

    async def workload_page(self, owner: str, limit: int = DEFAULT_PAGE, after: str | None = None
                            ) -> tuple[list[WorkloadView], int, str | None]:
        """A page of the owner's workloads, newest first, after the workload ``after``: (views,
        how many the owner has, the id to ask for the next page after, or None)."""
        sql = "SELECT * FROM workloads WHERE owner = ?"
        args: tuple = (owner,)
        if after:
            sql += " AND (created_at, id) < (SELECT created_at, id FROM workloads WHERE id = ? AND owner = ?)"
            args += (after, owner)
        async with self.db.execute(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit + 1)) as cur:
            rows = await cur.fetchall()
        async with self.db.execute("SELECT COUNT(*) FROM workloads WHERE owner = ?", (owner,)) as cur:
            (total,) = await cur.fetchone()
        more = len(rows) > limit
        rows = rows[:limit]
        return await self._views(rows), total, rows[-1]["id"] if more and rows else None

    async def _views(self, rows: list) -> list[WorkloadView]:
        """Views of workload rows: the counters are in the rows; the id lists come from one
        query per kind for all of them."""
        ids = [r["id"] for r in rows]
        filtered: dict[str, list[int]] = {i: [] for i in ids}
        failed: dict[str, list[dict]] = {i: [] for i in ids}
        for chunk in (ids[k:k + 500] for k in range(0, len(ids), 500)):
            marks = ",".join("?" * len(chunk))
            async with self.db.execute(
                f"SELECT workload_id, image_id FROM images WHERE type = ? AND workload_id IN ({marks})"
                " ORDER BY image_id", (ImageType.FILTERED.value, *chunk),
            ) as cur:
                for r in await cur.fetchall():
                    filtered[r[0]].append(r[1])
            async with self.db.execute(
                f"SELECT workload_id, image_id, error FROM jobs WHERE state = ? AND workload_id IN ({marks})"
                " ORDER BY image_id", (JobState.FAILED.value, *chunk),
            ) as cur:
                for r in await cur.fetchall():
                    failed[r[0]].append({"image_id": r[1], "reason": r[2]})
        return [WorkloadView(_workload(r), r["image_count"], filtered[r["id"]], failed[r["id"]],
                             r["running_count"], bool(r["started"])) for r in rows]

    # -- images -----------------------------------------------------------------------------

    async def next_image_id(self, workload_id: str) -> int:
        """One more than the highest original id so far (ids a client chose may leave gaps)."""
        async with self.db.execute(
            "SELECT next_image_id FROM workloads WHERE id = ?", (workload_id,)
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"workload {quoted(workload_id)} not found")
        return row[0]

    async def has_image(self, workload_id: str, image_id: int, type_: ImageType) -> bool:
        try:
            await self.get_image(workload_id, image_id, type_)
        except NotFound:
            return False
        return True

    async def image_header(self, workload_id: str, image_id: int, type_: ImageType
                           ) -> tuple[str, int | None, int | None, str | None]:
        """(format, width, height, mode) of a stored image (the last three None for images
        stored by earlier versions), or :class:`NotFound`."""
        async with self.db.execute(
            "SELECT format, width, height, mode FROM images WHERE workload_id = ? AND image_id = ? AND type = ?",
            (workload_id, image_id, type_.value),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"{type_.value} image {image_id} of workload {quoted(workload_id)} not found")
        return row[0], row[1], row[2], row[3]

    async def get_image(self, workload_id: str, image_id: int, type_: ImageType) -> str:
        """The stored format of an image, or :class:`NotFound`."""
        return (await self.image_header(workload_id, image_id, type_))[0]

    async def list_images(self, workload_id: str, type_: ImageType | None) -> list[dict]:
        sql = "SELECT image_id, type, size, format FROM images WHERE workload_id = ?"
        args: tuple = (workload_id,)
        if type_ is not None:
            sql += " AND type = ?"
            args += (type_.value,)
        async with self.db.execute(sql + " ORDER BY type, image_id", args) as cur:
            rows = await cur.fetchall()
        return [{"image_id": r[0], "type": r[1], "workload_id": workload_id, "size": r[2], "format": r[3]}
                for r in rows]

    # -- jobs -------------------------------------------------------------------------------

    async def job_counts(self) -> dict[str, int]:
        """How many jobs are in each state."""
        async with self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state") as cur:
            return {r[0]: r[1] for r in await cur.fetchall()}

    async def job_timings(self, workload_id: str) -> list[dict]:
        """Per job: state, attempts, copies sent, the winning worker, and its timeline."""
        async with self.db.execute(
            "SELECT image_id, state, attempts, copies, worker, error, created_at, dispatched_at,"
            " finished_at, download_ms, process_ms, upload_ms FROM jobs WHERE workload_id = ?"
            " ORDER BY image_id",
            (workload_id,),
        ) as cur:
            rows = await cur.fetchall()
        return [
            {
                "image_id": r[0], "state": r[1], "attempts": r[2], "copies": r[3], "worker": r[4],
                "error": r[5], "queued_at": r[6], "dispatched_at": r[7], "finished_at": r[8],
                "download_ms": r[9], "process_ms": r[10], "upload_ms": r[11],
                # The winning copy began its download this long before its result was stored.
                "started_at": (r[8] - (r[9] + r[10] + r[11]) / 1000)
                if r[8] is not None and r[9] is not None else None,
            }
            for r in rows
        ]

    # -- workers ----------------------------------------------------------------------------

    async def upsert_worker(self, name: str, tags: list[str], rpc_address: str) -> None:
        now = time.time()
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO workers(name, tags, rpc_address, first_seen, last_seen)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET tags = excluded.tags,"
                " rpc_address = excluded.rpc_address, last_seen = excluded.last_seen",
                (name, json.dumps(tags), rpc_address, now, now),
            )

    async def forget_worker(self, name: str) -> None:
        async with self.transaction() as db:
            await db.execute("DELETE FROM workers WHERE name = ?", (name,))

    async def known_workers(self) -> list[dict]:
        async with self.db.execute("SELECT name, tags, last_seen FROM workers") as cur:
            rows = await cur.fetchall()
        return [{"name": r[0], "tags": json.loads(r[1]), "last_seen": r[2]} for r in rows]
