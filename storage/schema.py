"""The datastore's tables, declared once: each engine's DDL, its migrations and its counter
triggers are built from here, and the states they count come from the enums themselves.

A column marked ``later`` was added by a later version: each engine adds it to a database made
by an earlier one (SQLite after looking at ``PRAGMA table_info``, PostgreSQL with
``ADD COLUMN IF NOT EXISTS``).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.models import ImageType, JobState

SQLITE, POSTGRESQL = "sqlite", "postgresql"

#: Portable column types -> each engine's.
TYPES = {
    SQLITE: {"text": "TEXT", "real": "REAL", "int": "INTEGER", "bigint": "INTEGER",
             "id": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    POSTGRESQL: {"text": "TEXT", "real": "DOUBLE PRECISION", "int": "INTEGER", "bigint": "BIGINT",
                 "id": "BIGSERIAL PRIMARY KEY"},
}


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # a key of TYPES
    constraint: str = ""  # e.g. "NOT NULL DEFAULT 0", "PRIMARY KEY"
    later: bool = False  # added by a later version: migrations add it where it is missing

    def ddl(self, engine: str) -> str:
        return " ".join(p for p in (self.name, TYPES[engine][self.type], self.constraint) if p)


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    constraints: tuple[str, ...] = ()  # table constraints: keys across columns

    def ddl(self, engine: str, name: str | None = None) -> str:
        lines = [c.ddl(engine) for c in self.columns] + list(self.constraints)
        return f"CREATE TABLE IF NOT EXISTS {name or self.name} (\n    " + ",\n    ".join(lines) + "\n);\n"

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


def _c(name: str, type_: str, constraint: str = "", later: bool = False) -> Column:
    return Column(name, type_, constraint, later)


NOT_NULL_0 = "NOT NULL DEFAULT 0"

TABLES = (
    Table("users", (_c("name", "text", "PRIMARY KEY"), _c("password_hash", "text", "NOT NULL"),
                    _c("created_at", "real", "NOT NULL"))),
    Table("revoked_tokens", (_c("jti", "text", "PRIMARY KEY"), _c("expires_at", "real", "NOT NULL"))),
    #: Where each user logged in from (an address's group: api.ratelimit), and when last: a
    #: familiar place is spared the account's budget of failed logins, across restarts too.
    Table("login_places", (_c("user_name", "text", "NOT NULL"), _c("place", "text", "NOT NULL"),
                           _c("last_seen", "real", "NOT NULL")), ("PRIMARY KEY (user_name, place)",)),
    #: Names are unique per owner; ``dir`` (the images directory) is unique across owners. The
    #: counters are kept by the triggers below, so that a workload's status costs one row.
    Table("workloads", (
        _c("id", "text", "PRIMARY KEY"), _c("name", "text", "NOT NULL"), _c("dir", "text", "NOT NULL UNIQUE"),
        _c("owner", "text", "NOT NULL"), _c("filter", "text", "NOT NULL"), _c("tags", "text", "NOT NULL DEFAULT ''"),
        _c("created_at", "real", "NOT NULL"), _c("next_image_id", "int", NOT_NULL_0),
        _c("meta", "text", "NOT NULL DEFAULT '{}'", later=True), _c("params", "text", "NOT NULL DEFAULT '{}'", later=True),
        _c("image_count", "int", NOT_NULL_0, later=True), _c("filtered_count", "int", NOT_NULL_0, later=True),
        _c("failed_count", "int", NOT_NULL_0, later=True), _c("running_count", "int", NOT_NULL_0, later=True),
        _c("started", "int", NOT_NULL_0, later=True),
        _c("bytes", "bigint", NOT_NULL_0, later=True),  # of its images, originals and results: quotas
    ), ("UNIQUE (owner, name)",)),
    Table("images", (
        _c("workload_id", "text", "NOT NULL REFERENCES workloads(id)"), _c("image_id", "int", "NOT NULL"),
        _c("type", "text", "NOT NULL"), _c("format", "text", "NOT NULL"), _c("size", "bigint", "NOT NULL"),
        _c("created_at", "real", "NOT NULL"),
        _c("width", "int", later=True), _c("height", "int", later=True),  # upright, from the header at upload
        _c("mode", "text", later=True),
        _c("filename", "text", later=True),  # the uploaded file's name (originals)
        _c("photo", "text", later=True),  # JSON: camera, time taken, GPS position (owner only)
    ), ("PRIMARY KEY (workload_id, type, image_id)",)),
    Table("jobs", (
        _c("id", "id"), _c("workload_id", "text", "NOT NULL REFERENCES workloads(id)"),
        _c("image_id", "int", "NOT NULL"), _c("state", "text", "NOT NULL"), _c("attempts", "int", NOT_NULL_0),
        _c("worker", "text"), _c("error", "text"), _c("created_at", "real", "NOT NULL"),
        _c("dispatched_at", "real"), _c("deadline", "real"), _c("finished_at", "real"),
        _c("copies", "int", NOT_NULL_0), _c("download_ms", "real"), _c("process_ms", "real"),
        _c("upload_ms", "real"),
    ), ("UNIQUE (workload_id, image_id)",)),
    Table("servers", (_c("name", "text", "PRIMARY KEY"), _c("api_url", "text", "NOT NULL"),
                      _c("controller", "text", "NOT NULL"), _c("started_at", "real", "NOT NULL"),
                      _c("last_seen", "real", "NOT NULL"))),
    Table("settings", (_c("name", "text", "PRIMARY KEY"), _c("value", "text", "NOT NULL"))),
    #: Directories of deleted workloads: never given to another workload, so that nothing a
    #: deleted workload left behind (a write in flight when it was deleted) is ever seen again.
    Table("retired_dirs", (_c("dir", "text", "PRIMARY KEY"), _c("retired_at", "real", "NOT NULL"))),
    Table("workers", (_c("name", "text", "PRIMARY KEY"), _c("tags", "text", "NOT NULL"),
                      _c("rpc_address", "text", "NOT NULL"), _c("first_seen", "real", "NOT NULL"),
                      _c("last_seen", "real", "NOT NULL"))),
)
#: Tables only servers sharing a database need (the scheduling lease, the users' version).
SHARED_TABLES = (
    Table("schema_version", (_c("version", "int", "NOT NULL"),)),
    Table("leases", (_c("name", "text", "PRIMARY KEY"), _c("holder", "text", "NOT NULL"),
                     _c("term", "bigint", "NOT NULL"), _c("expires_at", "real", "NOT NULL"))),
    Table("auth_version", (_c("version", "bigint", "NOT NULL"),)),
)
INDEXES = ("CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);",
           "CREATE INDEX IF NOT EXISTS workloads_owner ON workloads(owner, created_at);")
TABLE = {t.name: t for t in TABLES + SHARED_TABLES}


def create_all(engine: str) -> str:
    """Every table (those a shared database needs too, on PostgreSQL) and index."""
    tables = TABLES + (SHARED_TABLES if engine == POSTGRESQL else ())
    return "".join(t.ddl(engine) for t in tables) + "\n".join(INDEXES) + "\n"


def added_columns(engine: str, table: str, existing: set[str] | None = None) -> list[str]:
    """``ALTER TABLE`` statements for the later columns of ``table`` a database lacks: those
    not in ``existing`` (SQLite, which cannot say IF NOT EXISTS), or all of them, guarded
    (PostgreSQL)."""
    later = [c for c in TABLE[table].columns if c.later]
    if engine == POSTGRESQL:
        return [f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {c.ddl(engine)};" for c in later]
    assert existing is not None
    return [f"ALTER TABLE {table} ADD COLUMN {c.ddl(engine)}" for c in later if c.name not in existing]


# -- the counters ---------------------------------------------------------------------------

#: Workload counters kept as images arrive: column -> the image type it counts.
IMAGE_COUNTERS = {"image_count": ImageType.ORIGINAL, "filtered_count": ImageType.FILTERED}
#: Workload counters kept as jobs change state: column -> the state it counts.
JOB_COUNTERS = {"running_count": JobState.DISPATCHED, "failed_count": JobState.FAILED}
#: The one rule of a completed workload, in SQL over the counters (``WorkloadView.status`` in
#: Python says the same of its lists).
COMPLETED = "image_count > 0 AND filtered_count + failed_count >= image_count"


def _is(engine: str, column: str, value: str) -> str:
    """1 if ``column`` equals ``value``, else 0, in the engine's SQL."""
    return f"({column} = '{value}')" + ("::int" if engine == POSTGRESQL else "")


def images_counted(engine: str) -> str:
    """The SET list of the UPDATE an inserted image makes to its workload."""
    counts = [f"{col} = {col} + {_is(engine, 'NEW.type', t.value)}" for col, t in IMAGE_COUNTERS.items()]
    return ", ".join([*counts, "bytes = bytes + NEW.size"])


def jobs_counted(engine: str) -> str:
    """The SET list of the UPDATE a job's change of state makes to its workload."""
    counts = [f"{col} = {col} + {_is(engine, 'NEW.state', s.value)} - {_is(engine, 'OLD.state', s.value)}"
              for col, s in JOB_COUNTERS.items()]
    started = (f"started = CASE WHEN NEW.state = '{JobState.DISPATCHED.value}' THEN 1 ELSE started END"
               if engine == POSTGRESQL else f"started = started OR NEW.state = '{JobState.DISPATCHED.value}'")
    return ", ".join([*counts, started])


def recount() -> str:
    """Every workload's counters computed from its images and jobs (once, for a database made
    before the counters existed)."""
    images = [f"{col} = (SELECT COUNT(*) FROM images i WHERE i.workload_id = workloads.id AND i.type = '{t.value}')"
              for col, t in IMAGE_COUNTERS.items()]
    jobs = [f"{col} = (SELECT COUNT(*) FROM jobs j WHERE j.workload_id = workloads.id AND j.state = '{s.value}')"
            for col, s in JOB_COUNTERS.items()]
    return ("UPDATE workloads SET " + ", ".join([
        *images, *jobs,
        "started = EXISTS (SELECT 1 FROM jobs j WHERE j.workload_id = workloads.id AND j.attempts > 0)",
        "bytes = (SELECT COALESCE(SUM(size), 0) FROM images i WHERE i.workload_id = workloads.id)"]))
