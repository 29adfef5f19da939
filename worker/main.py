"""The reference's way to start a worker: ``cd worker/ && ../.venv/bin/python main.py ...``."""

import sys
from pathlib import Path

# Run as a script, Python puts worker/ first on sys.path; the project root must be there too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
