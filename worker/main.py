"""The reference's way to start a worker: ``cd worker/ && ../.venv/bin/python main.py ...``.

Started by a Python that lacks DPIP's dependencies (the system's ``python main.py``, as the
course's instructions say), it runs itself again, same arguments, under the project's venv
(``<repo>/.venv/bin/python``) if there is one; otherwise it says in one line to ``make install``.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
#: Set on the re-run: if the venv's Python lacks them too, say so instead of running again.
RERUN_MARK = "DPIP_WORKER_RERUN"
OUR_PACKAGES = {"worker", "common", "plane", "filtering", "imaging", "dpip"}

# Run as a script, Python puts worker/ first on sys.path; the project root must be there too.
sys.path.insert(0, str(ROOT))


def _in_venv() -> bool:
    try:
        return Path(sys.prefix).resolve() == VENV_PYTHON.parent.parent.resolve()
    except OSError:
        return False


def _missing(error: ModuleNotFoundError) -> None:
    """A dependency cannot be imported: run again under the venv's Python, or explain; never
    returns."""
    module = (error.name or str(error)).split(".")[0]
    if not os.environ.get(RERUN_MARK) and not _in_venv() and os.access(VENV_PYTHON, os.X_OK):
        print(f"worker: {sys.executable} has no module {module!r}: running under {VENV_PYTHON}",
              file=sys.stderr, flush=True)
        os.environ[RERUN_MARK] = "1"
        argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), *argv[1:]])
    if _in_venv():
        where = f"the project's venv ({sys.executable}) has no module {module!r}"
    elif os.environ.get(RERUN_MARK):
        where = f"{sys.executable} has no module {module!r}, even when run again for the venv"
    elif VENV_PYTHON.exists():
        where = f"{sys.executable} has no module {module!r}, and {VENV_PYTHON} cannot be run"
    else:
        where = f"{sys.executable} has no module {module!r}, and there is no {VENV_PYTHON}"
    print(f"worker: {where}: run `make install` first (in {ROOT}), then `../.venv/bin/python main.py ...`",
          file=sys.stderr, flush=True)
    sys.exit(1)


def run() -> None:
    try:
        from worker.cli import main
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in OUR_PACKAGES:
            raise  # a broken checkout, not a missing dependency
        _missing(e)
    os.environ.pop(RERUN_MARK, None)  # the worker's own children start afresh
    main()


if __name__ == "__main__":
    run()
