"""``make e2e``: start a throwaway system on free ports, run scripts/e2e.sh against it, stop it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.localsys import ROOT, LocalSystem


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dpip-e2e-") as tmp:
        system = LocalSystem(Path(tmp) / "data", log_dir=Path(tmp) / "logs")
        try:
            system.start_server()
            system.start_worker("e2e-1")
            system.start_worker("e2e-2")
            system.wait_workers({"e2e-1", "e2e-2"})
            env = {**os.environ, "DPIP_URL": system.url, "DPIP_USER": "admin",
                   "DPIP_PASSWORD": system.admin_password, "PYTHON": sys.executable}
            rc = subprocess.call(["bash", str(ROOT / "scripts" / "e2e.sh")], env=env)
            if rc != 0:
                print(system.logs())
            return rc
        finally:
            system.stop()


if __name__ == "__main__":
    sys.exit(main())
