"""A new user's first hour: the admin password, the course's worker command, `dpip push` of a
file that is no image, `dpip pull` without a DIR and with the uploaded names, Ctrl-C, a push
that stopped half-way, `--help`, and refused tokens. Real processes, free loopback ports.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from aiohttp import web

from cli import pushes
from cli.main import parser
from cli.names import local_names, safe_name
from tests.dpip_cli import DPIP, Cli, frames_dir, one_line_error
from tests.helpers import ADMIN_PASSWORD, ROOT, clean_env, metric, png, push, wait_until

#: What `os.login_tty` needs to give the child the pty as its terminal (getpass opens /dev/tty).
LOGIN_TTY = "import os, sys; os.login_tty(os.open(sys.argv[1], os.O_RDWR)); os.execv(sys.argv[2], sys.argv[2:])"
NOISE = ("Traceback", "Exception ignored", "Task was destroyed", "never retrieved")


@pytest.fixture
def cli(system, tmp_path) -> Cli:
    c = Cli(tmp_path / "config", system.url)
    c.ok("login", "--url", system.url, "--user", "admin")
    return c


def token_of(cli: Cli) -> str:
    return json.loads((cli.home / "dpip" / "config.json").read_text())["token"]


def api(cli: Cli, path: str, method: str = "GET") -> dict | list:
    req = urllib.request.Request(cli.url + path, method=method, headers={"Authorization": f"Bearer {token_of(cli)}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def workload_ids(cli: Cli) -> set[str]:
    return {w["workload_id"] for w in api(cli, "/workloads?limit=1000")}


# -- 1. where the admin password is -------------------------------------------------------------

class Pty:
    """`dpip` on a pseudo-terminal of its own, as in a user's terminal (Ctrl-C is b"\\x03")."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen([sys.executable, "-c", LOGIN_TTY, os.ttyname(slave), DPIP, *args],
                                     stdin=slave, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        self.seen = b""

    def read_until(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {text!r} on the terminal; it shows {self.seen!r}")
            if select.select([self.master], [], [], left)[0]:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the child has closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the terminal closed before {text!r}; it shows {self.seen!r}")
                self.seen += chunk
        return self.seen.decode(errors="replace")

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        rc = self.proc.wait(timeout)
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.seen += chunk
        os.close(self.master)
        return rc, self.seen.decode(errors="replace")


@pytest.fixture
def pty_env(system, tmp_path) -> dict[str, str]:
    return clean_env(XDG_CONFIG_HOME=str(tmp_path / "config"), DPIP_URL=system.url)


def test_readme_says_where_the_admin_password_is():
    readme = (ROOT / "README.md").read_text()
    assert "data/admin-password" in readme and "make run" in readme
    assert re.search(r"password.{0,80}print", readme, re.S | re.I), "README: make run prints the password"


def test_login_prompt_says_where_the_admin_password_is(system, pty_env, tmp_path):
    term = Pty(["login"], pty_env)
    try:
        prompt = term.read_until("): ")
        assert "password for admin at" in prompt
        assert "printed by make run, also in data/admin-password" in prompt
        os.write(term.master, ADMIN_PASSWORD.encode() + b"\n")
        rc, shown = term.finish()
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert rc == 0, shown
    assert json.loads((tmp_path / "config" / "dpip" / "config.json").read_text())["token"]


def test_ctrl_c_at_the_password_prompt_stops_at_once(system, pty_env):
    term = Pty(["login"], pty_env)
    try:
        term.read_until("): ")
        os.write(term.master, b"\x03")  # the terminal turns it into SIGINT
        rc, shown = term.finish(timeout=15)
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert rc == 130, shown
    assert "dpip: interrupted" in shown and not any(n in shown for n in NOISE), shown


def test_login_without_a_terminal_says_where_the_password_is(system, tmp_path):
    r = subprocess.run([DPIP, "login", "--url", system.url], env=clean_env(XDG_CONFIG_HOME=str(tmp_path)),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    one_line_error(r, 3, "DPIP_PASSWORD", "data/admin-password")


# -- 2. the course's worker command under the system's python ----------------------------------

VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A Python without DPIP's dependencies, like the system's (made here: the machine's own
    may or may not have Pillow)."""
    where = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    if subprocess.run([python, "-c", "import PIL"], capture_output=True).returncode == 0:
        pytest.skip("this Python has Pillow even in a bare venv")
    return python


def copy_of_the_worker(root: Path, venv_python: Path | None) -> Path:
    """A repository with the worker's code and, if given, `venv_python` as its .venv's python."""
    for package in ("worker", "common", "plane", "filtering", "imaging", "dpip"):  # what the worker imports
        subprocess.run(["cp", "-r", str(ROOT / package), str(root / package)], check=True)
    if venv_python is not None:
        (root / ".venv" / "bin").mkdir(parents=True)
        (root / ".venv" / "bin" / "python").symlink_to(venv_python)
    return root / "worker"


def test_the_course_worker_command_runs_under_the_venv(system, bare_python):
    if not VENV_PYTHON.exists():
        pytest.skip("no .venv in this checkout (make install makes it)")
    token = system.login()
    argv = [str(bare_python), "main.py", "--controller", system.controller, "--worker-name", "extra", "--tags", "gpu"]
    proc = subprocess.Popen(argv, cwd=ROOT / "worker", env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: "extra" in system.alive_workers(token) or proc.poll() is not None, 60, "worker extra")
        assert proc.poll() is None, proc.communicate()
        extra = next(w for w in system.get("/status", token)["workers"] if w["name"] == "extra")
        assert extra["tags"] == ["gpu"]
        assert psutil.Process(proc.pid).cmdline()[:2] == [str(VENV_PYTHON), "main.py"]  # same pid, same argv
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert f"running under {VENV_PYTHON}" in stderr and "Traceback" not in stderr


def test_the_worker_command_without_a_venv_says_make_install(bare_python, tmp_path):
    worker = copy_of_the_worker(tmp_path, None)
    r = subprocess.run([bare_python, "main.py", "--controller", "localhost:1"], cwd=worker, env=clean_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr  # one line
    assert "run `make install` first" in r.stderr and "no module 'PIL'" in r.stderr


def test_the_worker_command_does_not_loop_when_the_venv_lacks_them_too(bare_python, tmp_path):
    worker = copy_of_the_worker(tmp_path, bare_python)  # a .venv as bare as the python
    r = subprocess.run([bare_python, "main.py", "--controller", "localhost:1"], cwd=worker, env=clean_env(),
                       capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 2, r.stderr  # ran again once, then gave up
    assert "running under" in lines[0] and "run `make install` first" in lines[1]


# -- 4. push checks its files first -------------------------------------------------------------

def test_push_checks_every_file_before_creating_anything(cli: Cli, tmp_path):
    frames_dir(tmp_path / "ok", 3)
    notes = tmp_path / "notes.txt"
    notes.write_text("meeting notes")
    fake = tmp_path / "ok" / "fake.png"
    fake.write_text("not a PNG at all")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    before = workload_ids(cli)
    one_line_error(cli("push", notes), 1, "notes.txt: not an image", "nothing was pushed")
    one_line_error(cli("push", tmp_path / "ok"), 1, "fake.png", "not an image")
    one_line_error(cli("push", tmp_path / "ok" / "0.png", tmp_path / "empty.jpg"), 1, "empty.jpg", "not an image")
    one_line_error(cli("push", tmp_path / "dangling.png"), 1, "dangling.png", "no such file")
    assert workload_ids(cli) == before  # nothing was created, so nothing hangs in `scheduling`
    fake.unlink()
    assert cli.ok("push", tmp_path / "ok", "-q").stdout.strip() in workload_ids(cli)


# -- 7. a push that stopped half-way is partial ------------------------------------------------

def row_of(table: str, wid: str) -> str:
    return next(line for line in table.splitlines() if wid in line)


def test_a_push_refused_half_way_is_partial_and_resumes(cli: Cli, tmp_path):
    files = frames_dir(tmp_path / "frames", 20)
    bad = files[7].read_bytes()
    files[7].write_bytes(bad[:8] + b"not a PNG header" * 4)  # PNG's magic, then garbage: the server refuses it
    r = cli("push", tmp_path / "frames", "--jobs", "1", "-q")
    one_line_error(r, 1, "7.png", "partial", "resume with the same command and --workload", alone=False)
    wid = re.search(r"workload (\S+) has 7 of 20 images", r.stderr).group(1)
    view = api(cli, f"/workloads/{wid}")
    assert view["meta"][pushes.EXPECTED] == 20 and view["images"] == 7
    wait_until(lambda: api(cli, f"/workloads/{wid}")["status"] == "completed", 60, "the 7 to be filtered")
    row = row_of(cli.ok("workloads").stdout, wid)
    assert "partial" in row and "7 of 20" in row and "completed" not in row
    one_line_error(cli("watch", wid, "--stall-timeout", "1", "-q"), 1, "is partial", "7 of 20", alone=False)

    files[7].write_bytes(bad)  # fixed: the same command finishes it
    cli.ok("push", tmp_path / "frames", "--workload", wid, "-q")
    cli.ok("watch", wid, "-q")
    row = row_of(cli.ok("workloads").stdout, wid)
    assert "completed" in row and "partial" not in row and " 20 " in row


def test_video_pull_refuses_a_partial_workload(cli: Cli, system, tmp_path):
    # a workload as `dpip video push` makes one for 5 frames, which gets only 2 of them
    req = urllib.request.Request(f"{cli.url}/workloads", method="POST", data=json.dumps(
        {"meta": {pushes.EXPECTED: 5, "video": {"fps": "12"}}}).encode(),
        headers={"Authorization": f"Bearer {token_of(cli)}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        wid = json.load(resp)["workload_id"]
    assert api(cli, f"/workloads/{wid}")["meta"][pushes.EXPECTED] == 5
    push(system, token_of(cli), wid, {i: png((i * 40, 0, 0)) for i in range(2)})
    out = tmp_path / "short.mp4"
    r = cli("video", "pull", wid, out, "--stall-timeout", "1", "-q")
    one_line_error(r, 1, "is partial", "2 of 5", "no video written", alone=False)
    assert not out.exists() and list(tmp_path.glob(".short*")) == []


# -- 6. Ctrl-C: a short message, exit 130, never a traceback --------------------------------------

@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    clip = tmp_path_factory.mktemp("clip") / "long.mp4"
    subprocess.run([DPIP, "video", "sample", str(clip), "--seconds", "10", "--fps", "12"], check=True,
                   capture_output=True, timeout=120)
    return clip


def _requests(url: str, route: str, method: str) -> float:
    return metric(url, "dpip_http_requests_total", route=route, method=method)


STAGES = {  # when to press Ctrl-C: after the server has seen this many more of these requests
    "created": ("/workloads", "POST", 1),
    "pushing": ("/images", "POST", 8),
    "joining": ("/images/{image_id}", "GET", 4),
}


@pytest.mark.parametrize("attempt", [1, 2])
@pytest.mark.parametrize("stage", list(STAGES))
def test_ctrl_c_of_video_run_is_one_line_and_130(cli: Cli, long_clip, tmp_path, stage, attempt):
    route, method, more = STAGES[stage]
    before = _requests(cli.url, route, method)
    out = tmp_path / "out.mp4"
    proc = subprocess.Popen([DPIP, "video", "run", long_clip, out, "--jobs", "2"], env=cli.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _requests(cli.url, route, method) >= before + more or proc.poll() is not None,
                   60, f"dpip video run to be {stage}")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert not any(n in stderr for n in NOISE), stderr
    assert stderr.strip().splitlines()[-1] == "dpip: interrupted"
    assert not out.exists() and list(tmp_path.glob(".out*")) == []  # no half video passes for one

    # 7: what the interrupted push left shows as partial, or is gone if it had nothing
    if found := re.search(r"^workload (\S+) \(", stderr, re.M):
        wid = found.group(1)
        view = api_or_none(cli, f"/workloads/{wid}")
        if view is None:
            assert f"workload {wid} removed" in stderr
        elif view["images"] < 120:
            assert view["meta"][pushes.EXPECTED] == 120
            one_line_error(cli("watch", wid, "--stall-timeout", "1", "-q"), 1, "is partial", alone=False)
            assert "partial" in row_of(cli.ok("workloads").stdout, wid)


def api_or_none(cli: Cli, path: str):
    try:
        return api(cli, path)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def test_ctrl_c_of_push_says_how_to_resume(cli: Cli, tmp_path):
    frames_dir(tmp_path / "many", 300)
    before = _requests(cli.url, "/images", "POST")
    proc = subprocess.Popen([DPIP, "push", tmp_path / "many", "--jobs", "1"], env=cli.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _requests(cli.url, "/images", "POST") >= before + 5 or proc.poll() is not None, 60,
                   "dpip push to upload")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and not any(n in stderr for n in NOISE), stderr
    assert stderr.strip().splitlines()[-1] == "dpip: interrupted"
    assert "(partial): resume with the same command and --workload" in stderr
    assert stdout == ""  # no workload id on stdout: the push did not finish


# -- 5. pull: DIR defaults to here; the uploaded names on request -------------------------------

def test_pull_writes_into_the_current_directory_by_default(cli: Cli, tmp_path):
    frames_dir(tmp_path / "frames", 3)
    wid = cli.ok("push", tmp_path / "frames", "-q").stdout.strip()
    here = tmp_path / "here"
    here.mkdir()
    r = subprocess.run([DPIP, "pull", wid, "--wait", "-q"], env=cli.env(), cwd=here, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in here.iterdir()) == ["0.png", "1.png", "2.png"]


def test_pull_original_names_from_the_real_server(cli: Cli, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for name, colour in (("cat.png", (200, 0, 0)), ("dog.png", (0, 200, 0))):
        (src / name).write_bytes(png(colour))
    wid = cli.ok("push", src, "-q").stdout.strip()
    cli.ok("watch", wid, "-q")
    out = tmp_path / "out"
    cli.ok("pull", wid, out, "--names", "original", "-q")
    listed = api(cli, f"/images?workload_id={wid}&type=original")
    assert sorted(e["filename"] for e in listed) == ["cat.png", "dog.png"], "the server keeps the names"
    assert sorted(p.name for p in out.iterdir()) == ["cat.png", "dog.png"]


PNG = png((10, 20, 30))
FAKE_NAMES = {  # image id -> the file name a client uploaded it with, as a server would list it
    0: "../../escape.png", 1: "a/b/photo.png", 2: "dup.png", 3: "DUP.png", 4: None, 5: "..",
    6: ".hidden.png", 7: "tab\there.png", 8: "C:\\Users\\x\\win.png", 9: "4.png",
}


@pytest.fixture
async def fake_server(aiohttp_server):
    """A server that lists file names (what the real one will do), with hostile ones."""
    wid = "w-1"

    async def workload(request: web.Request) -> web.Response:
        return web.json_response({"workload_id": wid, "workload_name": "names", "filter": "grayscale",
                                  "status": "completed", "running_jobs": 0, "images": len(FAKE_NAMES),
                                  "filtered_images": sorted(FAKE_NAMES), "failed_images": [], "meta": {}})

    async def listing(request: web.Request) -> web.Response:
        type_ = request.query.get("type", "original")
        rows = []
        for i, name in FAKE_NAMES.items():
            row = {"image_id": i, "type": type_, "workload_id": wid, "size": len(PNG), "format": "PNG"}
            if name is not None and type_ == "original":  # the filtered listing does not repeat them
                row["filename"] = name
            rows.append(row)
        return web.json_response(rows)

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def bad_status(request: web.Request) -> web.Response:
        return web.json_response(["not", "a", "status"])

    app = web.Application()
    app.router.add_get("/workloads/{wid}", workload)
    app.router.add_get("/images", listing)
    app.router.add_get("/images/{id}", image)
    app.router.add_get("/status", bad_status)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}", wid


async def run_dpip(url: str, *args: str | Path, cwd: Path | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(DPIP, *map(str, args), cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE,
                                                env=clean_env(DPIP_URL=url, DPIP_TOKEN="t", XDG_CONFIG_HOME="/nonexistent"))
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, err.decode()


async def test_pull_keeps_uploaded_names_safely(fake_server, tmp_path):
    url, wid = fake_server
    out = tmp_path / "out"
    rc, err = await run_dpip(url, "pull", wid, out, "--names", "original", "-q")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "escape.png", "photo.png", "dup.png", "DUP-3.png", "4-4.png", "5.png", "hidden.png", "tab_here.png",
        "win.png", "4.png"])  # image 4 has no name: <id>.png, taken by image 9's own "4.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing outside DIR
    rc, err = await run_dpip(url, "pull", wid, out, "--names", "original")
    assert rc == 0 and "downloaded 0, kept 10" in err, err  # the same names again: a re-run skips them

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.png").write_text("my own photo, not the server's")
    rc, err = await run_dpip(url, "pull", wid, mine, "--names", "original")
    assert rc == 1 and "photo.png already there with other content: not overwritten" in err, err
    assert (mine / "photo.png").read_text() == "my own photo, not the server's"
    assert sorted(p.name for p in mine.iterdir()) == ["photo.png"]  # nothing downloaded at all


def test_local_names_are_safe_distinct_and_stable():
    entries = [{"image_id": i, "format": "PNG", "filename": n} for i, n in FAKE_NAMES.items()]
    names = local_names(entries, "original")
    assert all("/" not in n and "\\" not in n and not n.startswith(".") for n in names.values())
    assert len({n.casefold() for n in names.values()}) == len(entries)
    assert local_names(list(reversed(entries)), "original") == names
    assert local_names(entries, "id") == {i: f"{i}.png" for i in FAKE_NAMES}
    assert safe_name("x" * 300 + ".png").endswith(".png") and len(safe_name("x" * 300 + ".png")) <= 200
    assert safe_name("...") is None and safe_name("/") is None and safe_name(3) is None


# -- 8. --help is plain text --------------------------------------------------------------------

def every_parser() -> Iterator:
    todo = [parser()]
    while todo:
        p = todo.pop()
        yield p
        for action in p._actions:
            if action.choices and isinstance(action.choices, dict):
                todo.extend(action.choices.values())


def test_help_has_no_markup():
    helps = [p.format_help() for p in every_parser()]
    assert len(helps) >= 14
    for text in helps:
        assert "``" not in text and "`" not in text and ":class:" not in text, text
    r = subprocess.run([DPIP, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "`" not in r.stdout and "data/admin-password" in r.stdout


# -- 9. refused tokens in plain words; no traceback even for a surprise ----------------------------

def test_refused_tokens_in_plain_words(cli: Cli, tmp_path):
    token = token_of(cli)
    api(cli, "/logout", "DELETE")
    one_line_error(cli("status"), 3, "your session was revoked (logged out): run `dpip login`")
    one_line_error(cli("workloads", DPIP_TOKEN=token), 3,
                   "the token in $DPIP_TOKEN was revoked", "unset it and run `dpip login`")
    one_line_error(cli("status", DPIP_TOKEN="not-a-token"), 3, "the token in $DPIP_TOKEN is not valid on this server")
    for r in (cli("status"), cli("status", DPIP_TOKEN="x")):
        assert "invalid token" not in r.stderr and "Bearer" not in r.stderr  # not the server's wording


def test_an_expired_session_in_plain_words(make_system, tmp_path):
    system = make_system("--token-ttl", "1")
    c = Cli(tmp_path / "config", system.url)
    c.ok("login", "--url", system.url)
    token = token_of(c)

    def refused() -> bool:
        try:
            system.get("/status", token)
        except urllib.error.HTTPError as e:
            return e.code == 401
        return False

    wait_until(refused, 30, "the token to expire")
    one_line_error(c("status"), 3, "your session has expired: run `dpip login`")


async def test_a_surprise_answer_is_one_line_not_a_traceback(fake_server):
    url, _ = fake_server
    rc, err = await run_dpip(url, "status")
    assert rc == 1 and "Traceback" not in err, err
    assert err.strip().splitlines() == [err.strip()] and err.startswith("dpip: unexpected error"), err
