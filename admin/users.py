"""``python main.py users add|remove|list|unlock``: manage users in the data dir's datastore.

Works on a stopped or a running server (SQLite serialises the writers; a running server notices
within a second). Passwords are
prompted for, or read from ``DPIP_PASSWORD`` (for scripts); only scrypt hashes are stored.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
import time
from pathlib import Path

from common.models import BadInput, Conflict, check_workload_name
from controller.auth import hash_password
from storage import engines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="main.py users", description="Manage DPIP users.")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DPIP_DATA_DIR", "data")),
                   help="the server's data dir [env DPIP_DATA_DIR]")
    p.add_argument("--database", default=os.environ.get("DPIP_DATABASE", ""),
                   help="the server's datastore, if not the data dir's SQLite file [env DPIP_DATABASE]")
    sub = p.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="add a user (password prompted, or DPIP_PASSWORD)")
    add.add_argument("name")
    rm = sub.add_parser("remove", help="remove a user (their tokens stop working; their workloads stay,"
                                       " but not for a new user of the same name)")
    rm.add_argument("name")
    sub.add_parser("list", help="list the users")
    unlock = sub.add_parser("unlock", help="forgive a user's failed logins, on every server of the system (a"
                                           " running one applies it at the user's next attempt)")
    unlock.add_argument("name")
    return p


def _ask_password(name: str) -> str:
    """DPIP_PASSWORD, or asked twice (a typo in a hidden field is not seen)."""
    if os.environ.get("DPIP_PASSWORD"):
        return os.environ["DPIP_PASSWORD"]
    first = getpass.getpass(f"password for {name}: ")
    if getpass.getpass("the same password again: ") != first:
        raise BadInput("the two passwords differ: nothing was changed")
    return first


async def _run(a: argparse.Namespace) -> str:
    if engines.is_sqlite(a.database):
        engines.sqlite_path(a.database, a.data_dir).parent.mkdir(parents=True, exist_ok=True)
    store = engines.open_datastore(a.database, a.data_dir)
    await store.open()
    try:
        if a.action == "list":
            users = await store.list_users()
            return "\n".join(f"{name}\tcreated {time.strftime('%Y-%m-%d %H:%M', time.gmtime(t))}Z"
                             for name, t in users) or "(no users)"
        if a.action == "unlock":
            if await store.user(a.name) is None:
                raise BadInput(f"no user {a.name!r}")
            await store.unlock_user(a.name)
            return f"unlocked user {a.name!r}: their failed logins are forgiven at their next attempt"
        if a.action == "remove":
            if not await store.remove_user(a.name):
                raise BadInput(f"no user {a.name!r}")
            return f"removed user {a.name!r}; their tokens stop working within a second"
        check_workload_name(a.name)  # same rule: a safe, printable name
        password = _ask_password(a.name)
        if len(password) < 8:
            raise BadInput("the password must have at least 8 characters")
        await store.add_user(a.name, await asyncio.to_thread(hash_password, password))
        return f"added user {a.name!r}"
    finally:
        await store.close()


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    try:
        print(asyncio.run(_run(a)))
        return 0
    except (BadInput, Conflict) as e:
        print(f"error: {str(e).replace('workload_name', 'user name')}", file=sys.stderr)
        return 1
