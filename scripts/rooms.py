"""``python -m scripts.rooms [REV]``: DPIP's rooms (top-level packages), each with its modules,
their lines and the first line of their docstring: the tree as a new engineer first reads it.
With a git revision, that revision's tree instead of the working tree's."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"tests", "examples", "docs"}


def files(rev: str | None) -> dict[str, str]:
    """path -> source of every Python file of DPIP's packages (not the tests)."""
    if rev is None:
        paths = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
        return {p: (ROOT / p).read_text() for p in paths if (ROOT / p).exists()}
    paths = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    return {p: subprocess.run(["git", "show", f"{rev}:{p}"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout for p in paths if p.endswith(".py")}


def first_line(source: str) -> str:
    try:
        doc = ast.get_docstring(ast.parse(source)) or ""
    except SyntaxError:
        return "?"
    return doc.strip().split("\n", 1)[0][:90]


def main() -> None:
    rev = sys.argv[1] if len(sys.argv) > 1 else None
    rooms: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
    for path, source in sorted(files(rev).items()):
        room = path.split("/", 1)[0] if "/" in path else "."
        if room in SKIP:
            continue
        rooms[room].append((path, source.count("\n"), first_line(source)))
    total = 0
    for room, modules in sorted(rooms.items()):
        lines = sum(n for _, n, _ in modules)
        total += lines
        print(f"{room + '/':12} {len(modules):3} modules {lines:6} lines; largest {max(n for _, n, _ in modules)}")
        for path, n, doc in modules:
            print(f"    {path:34} {n:5}  {doc}")
    print(f"{'all':12} {sum(len(m) for m in rooms.values()):3} modules {total:6} lines")


if __name__ == "__main__":
    main()
