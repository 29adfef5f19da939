"""Running the installed `dpip` like a user's shell does, for the tests that drive it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.helpers import ADMIN_PASSWORD, clean_env

DPIP = str(Path(sys.executable).parent / "dpip")


class Cli:
    """Runs `dpip` with its own config dir, like a user's shell."""

    def __init__(self, home: Path, url: str) -> None:
        self.home, self.url = home, url

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(**{"XDG_CONFIG_HOME": str(self.home), "DPIP_PASSWORD": ADMIN_PASSWORD, **extra})

    def __call__(self, *args: str | Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([DPIP, *map(str, args)], env=self.env(**env), capture_output=True,
                              text=True, timeout=timeout)

    def ok(self, *args: str | Path, **env: str) -> subprocess.CompletedProcess:
        r = self(*args, **env)
        assert r.returncode == 0, f"dpip {args}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr
        return r


def one_line_error(r: subprocess.CompletedProcess, code: int, *words: str, alone: bool = True) -> None:
    """Exit ``code`` and a one-line reason (after the progress bars, if ``alone`` is False)."""
    assert r.returncode == code, f"rc {r.returncode}, wanted {code}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and (len(lines) == 1 or not alone), r.stderr
    line = lines[-1]
    assert line.startswith("dpip: "), r.stderr
    for word in words:
        assert word in line, line


def frames_dir(path: Path, count: int) -> list[Path]:
    """Frames that differ from each other, named 0.png .. count-1.png (10.png sorts before 2.png)."""
    path.mkdir()
    files = []
    for i in range(count):
        im = Image.new("RGB", (48, 32), (i * 8 % 256, 255 - i * 5, (i * 40) % 256))
        im.paste((255, 255, 255), (i, 0, i + 4, 32))
        im.save(path / f"{i}.png")
        files.append(path / f"{i}.png")
    (path / "notes.txt").write_text("not an image: push skips it")
    return files
