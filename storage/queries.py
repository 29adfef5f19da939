"""The datastore's reads and writes, once for every SQL engine (:mod:`storage.sql` scripts).

:class:`SqlDatastore` implements the :class:`~storage.datastore.Datastore` contract on top of
two primitives an engine provides: ``read(script)`` (one consistent read, committed data only)
and ``write(script, durable)`` (one transaction, all or nothing). The SQLite engine
(:mod:`storage.sqlite`) runs a script in one trip to its thread and commits concurrent
transactions together; the PostgreSQL engine runs them on a pool.
"""

from __future__ import annotations

import abc
import json
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from common.models import (
    Conflict,
    Filter,
    ImageType,
    JobState,
    NotFound,
    Workload,
    WorkloadView,
    quoted,
)
from storage import schema
from storage.sql import Script, one_statement, q

if TYPE_CHECKING:
    from storage.groupwrite import FileWrite

T = TypeVar("T")

#: A page of GET /workloads at most, and by default.
MAX_PAGE = 1000
DEFAULT_PAGE = 100
#: Workload columns, in the order :func:`workload_of` reads them.
WORKLOAD_COLUMNS = ("id, name, owner, filter, tags, created_at, meta, dir, params,"
                    " image_count, filtered_count, failed_count, running_count, started")


def stored_tags(text: str) -> tuple[str, ...]:
    """A row's tags column (written by the workloads service, checked then) as a tuple."""
    return tuple(t for t in text.split(",") if t)


def workload_of(row: Any) -> Workload:
    return Workload(row[0], row[1], row[2], Filter(row[3]), stored_tags(row[4]), row[5], json.loads(row[6]),
                    row[7], json.loads(row[8]))


def views_of(rows: list) -> Script[list[WorkloadView]]:
    """Views of workload rows (:data:`WORKLOAD_COLUMNS`): the counters are in the rows; the id
    lists come from one query per kind for all of them."""
    filtered: dict[str, list[int]] = {r[0]: [] for r in rows}
    failed: dict[str, list[dict]] = {r[0]: [] for r in rows}
    for chunk in (rows[k:k + 500] for k in range(0, len(rows), 500)):
        ids = [r[0] for r in chunk if r[10]]  # those with a filtered image
        if ids:
            marks = ",".join("?" * len(ids))
            for r in (yield q(f"SELECT workload_id, image_id FROM images WHERE type = ?"
                              f" AND workload_id IN ({marks}) ORDER BY image_id", ImageType.FILTERED.value, *ids)).rows:
                filtered[r[0]].append(r[1])
        ids = [r[0] for r in chunk if r[11]]  # those with a failed job
        if ids:
            marks = ",".join("?" * len(ids))
            for r in (yield q(f"SELECT workload_id, image_id, error FROM jobs WHERE state = ?"
                              f" AND workload_id IN ({marks}) ORDER BY image_id", JobState.FAILED.value, *ids)).rows:
                failed[r[0]].append({"image_id": r[1], "reason": r[2]})
    return [WorkloadView(workload_of(r), r[9], filtered[r[0]], failed[r[0]], r[12], bool(r[13])) for r in rows]


class SqlDatastore(abc.ABC):
    """Users, tokens, workloads, images, jobs and workers in SQL; an engine subclass provides
    :meth:`read`, :meth:`write` (and opening, closing, its schema)."""

    modifying_ctes = False  # (see storage.datastore.Datastore)

    @abc.abstractmethod
    async def read(self, script: Script[T]) -> T:
        """Run a read-only ``script``: it sees committed data, consistently."""

    @abc.abstractmethod
    async def write(self, script: Script[T], durable: bool = True) -> T:
        """Run ``script`` as one transaction, all or nothing (possibly committed together with
        others); its result once committed, and on disk unless it need not be ``durable``."""

    async def write_with_files(self, script: Script[T], files: Sequence[FileWrite], durable: bool = True) -> T:
        """``files`` written (each knows its writer; ``placed`` set), then ``script`` run as
        :meth:`write` runs it: a file is in place before the row that records it. A file's error
        is raised without running the script. An engine whose writes run in a thread of its
        own writes them there, in the same trip (SQLite)."""
        for f in files:
            f.placed = await f.writer.write(f.data, f.final, f.replace, f.sync)
        return await self.write(script, durable)

    # -- users and tokens -------------------------------------------------------------------

    async def count_users(self) -> int:
        return await self.read(_scalar("SELECT COUNT(*) FROM users"))

    async def add_user(self, name: str, password_hash: str) -> float:
        """Add a user; returns its ``created_at`` (tokens issued before it are not its own)."""
        now = time.time()

        def add() -> Script[None]:
            if (yield q("INSERT INTO users(name, password_hash, created_at) VALUES (?, ?, ?)"
                        " ON CONFLICT DO NOTHING", name, password_hash, now)).rowcount != 1:
                raise Conflict(f"user {quoted(name)} exists")

        await self.write(add())
        return now

    async def list_users(self) -> list[tuple[str, float]]:
        rows = await self.read(_rows("SELECT name, created_at FROM users ORDER BY name"))
        return [(r[0], r[1]) for r in rows]

    async def remove_user(self, name: str) -> bool:
        """Delete the user; their workloads stay, re-owned in the same transaction by a name no
        login can have (``:`` is not allowed in user names), so a new account of the same name
        does not inherit them."""
        tomb = f"removed:{name}:{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}:{uuid.uuid4().hex[:8]}"

        def remove() -> Script[bool]:
            if (yield q("DELETE FROM users WHERE name = ?", name)).rowcount != 1:
                return False
            yield q("UPDATE workloads SET owner = ? WHERE owner = ?", tomb, name)
            return True

        return await self.write(remove())

    async def user(self, name: str) -> tuple[str, float] | None:
        """``(password_hash, created_at)`` of a user, or None."""
        row = await self.read(_one("SELECT password_hash, created_at FROM users WHERE name = ?", name))
        return (row[0], row[1]) if row else None


    async def known_place(self, user: str, place: str, since: float) -> bool:
        """Whether ``user`` logged in from ``place`` after ``since``."""
        return bool(await self.read(_scalar("SELECT COUNT(*) FROM login_places WHERE user_name = ? AND place = ?"
                                            " AND last_seen >= ?", user, place, since)))

    async def remember_place(self, user: str, place: str, keep: int = 32) -> None:
        """``user`` logged in from ``place`` now; only their ``keep`` most recent places stay."""
        now = time.time()

        def remember() -> Script[None]:
            yield q("INSERT INTO login_places(user_name, place, last_seen) VALUES (?, ?, ?) ON CONFLICT(user_name, place)"
                    " DO UPDATE SET last_seen = excluded.last_seen", user, place, now)
            yield q("DELETE FROM login_places WHERE user_name = ? AND place NOT IN (SELECT place FROM login_places"
                    " WHERE user_name = ? ORDER BY last_seen DESC LIMIT ?)", user, user, keep)

        await self.write(remember())

    async def unlock_user(self, user: str) -> None:
        """Forgive ``user``'s failed logins (every server applies it at the user's next attempt)."""
        await self.write(_statement("INSERT INTO settings(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE"
                                    " SET value = excluded.value", f"unlock:{user}", repr(time.time())))

    async def unlocked_at(self, user: str) -> float:
        """When ``user``'s failed logins were last forgiven (0: never)."""
        return float(await self.read(_scalar("SELECT value FROM settings WHERE name = ?", f"unlock:{user}")) or 0)

    async def revoke_token(self, jti: str, expires_at: float) -> None:
        def revoke() -> Script[None]:
            yield q("INSERT INTO revoked_tokens(jti, expires_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    jti, expires_at)
            yield q("DELETE FROM revoked_tokens WHERE expires_at < ?", time.time())

        await self.write(revoke())

    async def revoked_tokens(self) -> set[str]:
        rows = await self.read(_rows("SELECT jti FROM revoked_tokens WHERE expires_at >= ?", time.time()))
        return {r[0] for r in rows}

    # -- settings shared by every server of the system --------------------------------------

    async def get_setting(self, name: str) -> str | None:
        return await self.read(_scalar("SELECT value FROM settings WHERE name = ?", name))

    async def setting(self, name: str, default: str) -> str:
        """The setting, made ``default`` if it has none yet (the first server to ask wins)."""
        def get_or_set() -> Script[str]:
            yield q("INSERT INTO settings(name, value) VALUES (?, ?) ON CONFLICT DO NOTHING", name, default)
            return (yield q("SELECT value FROM settings WHERE name = ?", name)).scalar()

        return await self.write(get_or_set())

    # -- the servers of the system ---------------------------------------------------------

    async def server_seen(self, name: str, api_url: str, controller: str, started_at: float) -> None:
        """This server is alive (every second or so)."""
        await self.write(_statement(
            "INSERT INTO servers(name, api_url, controller, started_at, last_seen) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE SET api_url = excluded.api_url, controller = excluded.controller,"
            " started_at = excluded.started_at, last_seen = excluded.last_seen",
            name, api_url, controller, started_at, time.time()), durable=False)

    async def servers(self) -> list[dict]:
        rows = await self.read(_rows("SELECT name, api_url, controller, started_at, last_seen FROM servers"
                                     " ORDER BY name"))
        return [{"name": r[0], "api_url": r[1], "controller": r[2], "started_at": r[3], "last_seen": r[4]}
                for r in rows]

    async def forget_servers(self, older_than: float) -> None:
        await self.write(_statement("DELETE FROM servers WHERE last_seen < ?", older_than), durable=False)

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

        def create() -> Script[str]:
            # Its directory is its name unless another user's workload has that one already, or
            # a deleted workload had it (a directory is never used twice): chosen in the
            # statement itself, so two creations at once cannot both take it (on an engine with
            # concurrent writers the loser tries the other directory).
            for dir_ in (None, f"{name}.{wid[:8]}"):
                result = yield q(
                    "INSERT INTO workloads(id, name, dir, owner, filter, tags, created_at, meta, params)"
                    " VALUES (?, ?, " + ("CASE WHEN EXISTS (SELECT 1 FROM workloads WHERE dir = ?) OR EXISTS"
                                         " (SELECT 1 FROM retired_dirs WHERE dir = ?) THEN ? ELSE ? END"
                                         if dir_ is None else "?") + ", ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT DO NOTHING RETURNING dir",
                    wid, name, *((name, name, f"{name}.{wid[:8]}", name) if dir_ is None else (dir_,)), owner,
                    filter.value, ",".join(tags), now, json.dumps(meta), json.dumps(params))
                if result.rows:
                    return result.scalar()
                if (yield q("SELECT 1 FROM workloads WHERE owner = ? AND name = ?", owner, name)).rows:
                    break
            raise Conflict(f"workload_name {quoted(name)} is already in use (by one of yours)")

        return Workload(wid, name, owner, filter, tags, now, meta, await self.write(create()), params)

    async def get_workload(self, workload_id: str, owner: str | None = None) -> Workload:
        """The workload, or :class:`NotFound` (also when ``owner`` is given and differs)."""
        row = await self.read(_one(f"SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE id = ?", workload_id))
        if row is None or (owner is not None and row[2] != owner):
            raise NotFound(f"workload {quoted(workload_id)} not found")
        return workload_of(row)

    async def workloads(self, owner: str) -> list[Workload]:
        """The owner's workloads, oldest first."""
        rows = await self.read(_rows(f"SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE owner = ?"
                                     " ORDER BY created_at", owner))
        return [workload_of(r) for r in rows]

    async def workload_view(self, workload: Workload) -> WorkloadView:
        return await self.view_of(workload.id)

    async def view_of(self, workload_id: str, owner: str | None = None) -> WorkloadView:
        """``GET /workloads/{id}``: the workload's row and lists, in one read; :class:`NotFound`
        also when ``owner`` is given and differs."""
        def view() -> Script[WorkloadView | None]:
            row = (yield q(f"SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE id = ?", workload_id)).one()
            if row is None or (owner is not None and row[2] != owner):
                return None
            return (yield from views_of([row]))[0]

        found = await self.read(view())
        if found is None:
            raise NotFound(f"workload {quoted(workload_id)} not found")
        return found

    async def active_views(self, owner: str) -> list[WorkloadView]:
        """The owner's workloads not completed, oldest first: one indexed query and the lists of
        those few, whatever the owner's history."""
        def active() -> Script[list[WorkloadView]]:
            rows = (yield q(f"SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE owner = ? AND NOT"
                            f" ({schema.COMPLETED}) ORDER BY created_at", owner)).rows
            return (yield from views_of(rows))

        return await self.read(active())

    async def workload_page(self, owner: str, limit: int = DEFAULT_PAGE, after: str | None = None
                            ) -> tuple[list[WorkloadView], int, str | None]:
        """A page of the owner's workloads, newest first, after the workload ``after``: (views,
        how many the owner has, the id to ask for the next page after, or None)."""
        def page() -> Script[tuple[list[WorkloadView], int, str | None]]:
            sql = f"SELECT {WORKLOAD_COLUMNS} FROM workloads WHERE owner = ?"
            args: tuple = (owner,)
            if after:
                sql += " AND (created_at, id) < (SELECT created_at, id FROM workloads WHERE id = ? AND owner = ?)"
                args += (after, owner)
            rows = list((yield q(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", *args, limit + 1)).rows)
            total = (yield q("SELECT COUNT(*) FROM workloads WHERE owner = ?", owner)).scalar()
            more = len(rows) > limit
            rows = rows[:limit]
            return (yield from views_of(rows)), total, rows[-1][0] if more and rows else None

        return await self.read(page())

    async def delete_workload(self, workload_id: str, owner: str | None = None) -> dict | None:
        """Remove the workload, its images' rows and its jobs, all or nothing; what was removed
        (counts and bytes), or None if there is no such workload (of ``owner``'s)."""
        def delete() -> Script[dict | None]:
            row = (yield q("SELECT owner, image_count, filtered_count, bytes, name, dir FROM workloads WHERE id = ?",
                           workload_id)).one()
            if row is None or (owner is not None and row[0] != owner):
                return None
            jobs = (yield q("DELETE FROM jobs WHERE workload_id = ?", workload_id)).rowcount
            yield q("DELETE FROM images WHERE workload_id = ?", workload_id)
            yield q("DELETE FROM workloads WHERE id = ?", workload_id)
            yield q("INSERT INTO retired_dirs(dir, retired_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    row[5], time.time())
            return {"workload_id": workload_id, "workload_name": row[4], "dir": row[5], "images": row[1],
                    "filtered_images": row[2], "jobs": jobs, "bytes": row[3]}

        return await self.write(delete())

    async def expired_workloads(self, before: float, limit: int = 100) -> list[tuple[str, str]]:
        """(id, owner) of completed workloads created before ``before``, oldest first."""
        rows = await self.read(_rows(
            f"SELECT id, owner FROM workloads WHERE created_at < ? AND {schema.COMPLETED}"
            " ORDER BY created_at LIMIT ?", before, limit))
        return [(r[0], r[1]) for r in rows]

    async def bytes_of(self, owner: str) -> int:
        """Bytes of every image of the owner's workloads (originals and results)."""
        return int(await self.read(_scalar("SELECT COALESCE(SUM(bytes), 0) FROM workloads WHERE owner = ?", owner)))

    # -- images -----------------------------------------------------------------------------

    async def next_image_id(self, workload_id: str) -> int:
        """One more than the highest original id so far (ids a client chose may leave gaps)."""
        row = await self.read(_one("SELECT next_image_id FROM workloads WHERE id = ?", workload_id))
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
        row = await self.read(_one("SELECT format, width, height, mode FROM images WHERE workload_id = ?"
                                   " AND image_id = ? AND type = ?", workload_id, image_id, type_.value))
        if row is None:
            raise NotFound(f"{type_.value} image {image_id} of workload {quoted(workload_id)} not found")
        return row[0], row[1], row[2], row[3]

    async def image_record(self, workload_id: str, image_id: int, type_: ImageType) -> tuple[str, int, float]:
        """(format, size, created_at) of a stored image, or :class:`NotFound`."""
        row = await self.read(_one("SELECT format, size, created_at FROM images WHERE workload_id = ?"
                                   " AND image_id = ? AND type = ?", workload_id, image_id, type_.value))
        if row is None:
            raise NotFound(f"{type_.value} image {image_id} of workload {quoted(workload_id)} not found")
        return row[0], row[1], row[2]

    async def get_image(self, workload_id: str, image_id: int, type_: ImageType) -> str:
        """The stored format of an image, or :class:`NotFound`."""
        return (await self.image_header(workload_id, image_id, type_))[0]

    async def list_images(self, workload_id: str, type_: ImageType | None) -> list[dict]:
        """The workload's images: size, format, the name the original was uploaded as (a result
        is listed with its original's), and for an original what its EXIF says (``photo``)."""
        sql = ("SELECT i.image_id, i.type, i.size, i.format, COALESCE(i.filename, o.filename), i.photo,"
               " i.width, i.height FROM images i LEFT JOIN images o ON o.workload_id = i.workload_id"
               " AND o.image_id = i.image_id AND o.type = 'original' AND i.type = 'filtered'"
               " WHERE i.workload_id = ?")
        args: tuple = (workload_id,)
        if type_ is not None:
            sql += " AND i.type = ?"
            args += (type_.value,)
        rows = await self.read(_rows(sql + " ORDER BY i.type, i.image_id", *args))
        out = []
        for r in rows:
            image = {"image_id": r[0], "type": r[1], "workload_id": workload_id, "size": r[2], "format": r[3],
                     "filename": r[4]}
            if r[1] == ImageType.ORIGINAL.value:
                image["photo"] = json.loads(r[5]) if r[5] else None
                if r[6] is not None:
                    image["width"], image["height"] = r[6], r[7]
            out.append(image)
        return out

    # -- jobs -------------------------------------------------------------------------------

    async def job_counts(self) -> dict[str, int]:
        """How many jobs are in each state."""
        return {r[0]: r[1] for r in await self.read(_rows("SELECT state, COUNT(*) FROM jobs GROUP BY state"))}

    async def job_timings(self, workload_id: str) -> list[dict]:
        """Per job: state, attempts, copies sent, the winning worker, and its timeline."""
        rows = await self.read(_rows(
            "SELECT image_id, state, attempts, copies, worker, error, created_at, dispatched_at,"
            " finished_at, download_ms, process_ms, upload_ms FROM jobs WHERE workload_id = ?"
            " ORDER BY image_id", workload_id))
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
        await self.write(_statement(
            "INSERT INTO workers(name, tags, rpc_address, first_seen, last_seen)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET tags = excluded.tags,"
            " rpc_address = excluded.rpc_address, last_seen = excluded.last_seen",
            name, json.dumps(tags), rpc_address, now, now))

    async def forget_worker(self, name: str) -> None:
        await self.write(_statement("DELETE FROM workers WHERE name = ?", name))

    async def known_workers(self) -> list[dict]:
        rows = await self.read(_rows("SELECT name, tags, last_seen FROM workers"))
        return [{"name": r[0], "tags": json.loads(r[1]), "last_seen": r[2]} for r in rows]


def _rows(sql: str, *params: Any) -> Script[list]:
    return (yield q(sql, *params)).rows


@one_statement
def _one(sql: str, *params: Any) -> Script[Any]:
    return (yield q(sql, *params)).one()


@one_statement
def _scalar(sql: str, *params: Any) -> Script[Any]:
    return (yield q(sql, *params)).scalar()


def _statement(sql: str, *params: Any) -> Script[int]:
    return (yield q(sql, *params)).rowcount
