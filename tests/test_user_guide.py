"""The curl and dpip examples of user-guide.md, run as written against a live system like `make run`'s.

Only the address and the data dir are rewritten (the test uses free ports and a temp dir);
the server generates the admin password, as on a first `make run`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from cli import video
from tests.helpers import ROOT, LocalSystem, clean_env


def guide_blocks() -> list[str]:
    text = (ROOT / "user-guide.md").read_text()
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_user_guide_curl_examples_work_as_written(tmp_path):
    blocks = guide_blocks()
    assert len(blocks) >= 6
    script = "\n".join(blocks)
    for endpoint in ("/login", "/logout", "/status", "/workloads", "/images"):
        assert endpoint in script, f"the guide has no example for {endpoint}"
    system = LocalSystem(tmp_path / "data", log_dir=tmp_path / "logs", admin_password="")
    with system:  # stopped whatever happens; its logs printed if this fails
        system.start_server()
        system.start_worker("guide-1")
        system.start_worker("guide-2")
        password = (system.data_dir / "admin-password").read_text().strip()
        system.wait_workers({"guide-1", "guide-2"}, system.login("admin", password))
        script = (script.replace("http://localhost:8080", system.url)
                  .replace("data/admin-password", str(system.data_dir / "admin-password"))
                  .replace(".venv/bin/python", sys.executable)
                  .replace(".venv/bin/dpip", str(Path(sys.executable).parent / "dpip")))
        work = tmp_path / "cwd"
        work.mkdir()
        env = clean_env(DPIP_URL=system.url, DPIP_PASSWORD=password, XDG_CONFIG_HOME=str(tmp_path / "config"))
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", f"timeout 120 bash -euo pipefail <<'EOS'\n{script}\nEOS"],
                           cwd=work, capture_output=True, text=True, timeout=150, env=env)
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{system.logs()}"
        assert '"logout_message"' in r.stdout and '"token"' in r.stdout
        assert '"missing token' in r.stdout  # the 401 example
        with Image.open(work / "0.png") as im, Image.open(work / "frame.png") as src:
            assert im.size == src.size and im.mode == "L"
        assert (work / "original-1.png").read_bytes() == (work / "frame.png").read_bytes()
        clip, gray = video.probe(work / "clip.mp4"), video.probe(work / "gray.mp4")  # the dpip walkthrough
        assert (gray.width, gray.height, gray.fps) == (clip.width, clip.height, clip.fps)
        assert len(list(video.frames(work / "gray.mp4"))) == len(list(video.frames(work / "clip.mp4"))) == 36
