"""Reads and transactions as *scripts*, written once for every SQL engine.

A script is a generator that yields the statements it wants run (:func:`q`) and receives each
one's :class:`Result`; what it returns is the script's result. The engine's driver decides how
statements travel: SQLite runs a whole script (a whole group of them) in one trip to its
thread, PostgreSQL awaits each statement on a pooled connection. So the job lifecycle and the
datastore's queries exist once, whatever stores them::

    def take_id(workload_id: str) -> Script[int]:
        result = yield q("UPDATE workloads SET next_image_id = next_image_id + 1 WHERE id = ?"
                         " RETURNING next_image_id - 1", workload_id)
        return result.scalar()

Statements use ``?`` placeholders and the SQL both engines speak (``RETURNING``, ``ON CONFLICT
DO NOTHING``, ``CASE`` rather than two-argument ``MAX``); a driver translates placeholders. A
statement that fails ends its script's transaction (PostgreSQL cannot go on after one), so a
script avoids expected failures in SQL (``ON CONFLICT DO NOTHING``, then looks at what it got);
a unique constraint that fails anyway leaves as :class:`UniqueViolation`, whatever the engine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from types import CodeType
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")


class Statement(NamedTuple):
    sql: str
    params: tuple


class Result:
    """The rows a statement returned (``RETURNING`` included) and how many rows it changed."""

    __slots__ = ("rows", "rowcount")

    def __init__(self, rows: Sequence[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def one(self) -> Any:
        """The first row, or None."""
        return self.rows[0] if self.rows else None

    def scalar(self) -> Any:
        """The first column of the first row, or None."""
        return self.rows[0][0] if self.rows else None


Script = Generator[Statement, Result, T]


class UniqueViolation(Exception):
    """A unique or primary-key constraint refused a row (any engine)."""


def q(sql: str, *params: Any) -> Statement:
    return Statement(sql, params)


def run(script: Script[T], execute: Callable[[Statement], Result]) -> T:
    """Drive ``script`` with a synchronous ``execute`` (in the engine's thread)."""
    try:
        statement = next(script)
        while True:
            statement = script.send(execute(statement))
    except StopIteration as done:
        return done.value


async def run_async(script: Script[T], execute: Callable[[Statement], Awaitable[Result]]) -> T:
    """Drive ``script`` with an asynchronous ``execute``."""
    try:
        statement = next(script)
        while True:
            statement = script.send(await execute(statement))
    except StopIteration as done:
        return done.value


def numbered(sql: str) -> str:
    """``?`` placeholders as ``$1, $2, ...`` (PostgreSQL's). Our statements have no ``?`` in
    literals."""
    parts = sql.split("?")
    return "".join(f"{part}${i}" for i, part in enumerate(parts[:-1], 1)) + parts[-1]


#: The code of script functions that run exactly one statement (see :func:`one_statement`).
ONE_STATEMENT: set[CodeType] = set()


def one_statement(fn: Callable[..., Script[T]]) -> Callable[..., Script[T]]:
    """Marks a script function that runs exactly one statement: a read of it needs no
    transaction of its own (one statement sees one snapshot), which on PostgreSQL is one round
    trip instead of three."""
    ONE_STATEMENT.add(fn.__code__)
    return fn


def is_one_statement(script: Script[Any]) -> bool:
    return getattr(script, "gi_code", None) in ONE_STATEMENT
