"""``make run``: the server and two local workers in the foreground; Ctrl-C stops all three.

Ports and data dir follow the usual flags' variables (DPIP_PORT, DPIP_CONTROLLER_PORT,
DPIP_DATA_DIR); defaults 8080, 40899 and ./data.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import API_PORT, CONTROLLER_PORT  # noqa: E402
from scripts.localsys import ROOT, LocalSystem  # noqa: E402


def main() -> int:
    system = LocalSystem(
        data_dir=Path(os.environ.get("DPIP_DATA_DIR", ROOT / "data")),
        port=int(os.environ.get("DPIP_PORT", API_PORT)),
        controller_port=int(os.environ.get("DPIP_CONTROLLER_PORT", CONTROLLER_PORT)),
        admin_password=os.environ.get("DPIP_ADMIN_PASSWORD", ""),
        inherit_env=True,
    )

    stop = {"signal": 0}

    def on_signal(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        system.start_server()
        for i in (1, 2):
            system.start_worker(f"local-{i}")
        pw_file = system.data_dir / "admin-password"
        how = f"$(cat {pw_file})" if pw_file.exists() else "$DPIP_ADMIN_PASSWORD"
        print(f"\nDPIP is up: API http://localhost:{system.port}, controller "
              f"{system.controller}, data in {system.data_dir}\n"
              f"  log in:  curl -u admin:{how} http://localhost:{system.port}/login\n"
              f"  Ctrl-C stops the server and both workers.\n", flush=True)
        assert system.server is not None
        while system.server.poll() is None and not stop["signal"]:
            time.sleep(0.2)
        if not stop["signal"] and system.server.returncode != 0:
            print(f"server exited with {system.server.returncode}", file=sys.stderr)
            return 1
        print("\nstopping DPIP ...", flush=True)
        return 0
    finally:
        # Ctrl-C reached the children too (same process group): let them finish first.
        system.stop(grace=10.0 if stop["signal"] == signal.SIGINT else 0.0)
        print("DPIP stopped.", flush=True)

if __name__ == "__main__":
    sys.exit(main())
