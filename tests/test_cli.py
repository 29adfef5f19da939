"""The `dpip` command, as installed in the venv, against a real server and real workers."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat

from cli import video
from cli.session import Session, save
from cli.transfer import collect, natural_key
from tests.dpip_cli import DPIP, Cli, frames_dir, one_line_error
from tests.helpers import clean_env, free_port, metric, wait_until


@pytest.fixture
def cli(system, tmp_path) -> Cli:
    c = Cli(tmp_path / "config", system.url)
    c.ok("login", "--url", system.url, "--user", "admin")
    return c


def test_login_keeps_the_token_private(cli: Cli):
    config = cli.home / "dpip" / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text())["token"]
    r = cli.ok("status", "--json")
    assert {w["name"] for w in json.loads(r.stdout)["workers"]} >= {"w1", "w2"}


def test_tables_and_json(cli: Cli):
    workers = cli.ok("workers")
    assert "w1" in workers.stdout and "w2" in workers.stdout and "fast,blue" in workers.stdout
    assert json.loads(cli.ok("workers", "--json").stdout)[0]["name"] == "w1"
    wid = cli.ok("push", frames_dir(cli.home / "few", 3)[0]).stdout.strip()
    listed = json.loads(cli.ok("workloads", "--json").stdout)
    assert wid in [w["workload_id"] for w in listed]
    assert wid in cli.ok("workloads").stdout
    status = cli.ok("status")
    assert "workers (" in status.stdout and "active workloads" in status.stdout


def test_push_then_pull_round_trips_30_frames(cli: Cli, system, tmp_path):
    files = frames_dir(tmp_path / "frames", 30)
    push = cli.ok("push", tmp_path / "frames", "--jobs", "4", "--name", "round-trip")
    wid = push.stdout.strip()
    assert push.stdout.count("\n") == 1 and len(wid) == 36, push.stdout  # only the id on stdout

    out = tmp_path / "out"
    pull = cli.ok("pull", wid, out, "--wait")
    assert "downloaded 30" in pull.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i}.png" for i in range(30))
    for i, src in enumerate(files):  # ids follow the numeric order of the names, K at a time
        with Image.open(out / f"{i}.png") as got, Image.open(src) as original:
            assert got.mode == "L" and got.tobytes() == original.convert("L").tobytes(), i

    originals = tmp_path / "originals"
    cli.ok("pull", wid, originals, "--type", "original")
    for i, src in enumerate(files):
        assert (originals / f"{i}.png").read_bytes() == src.read_bytes()

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "7.png").write_bytes(b"partial")  # an interrupted download: fetched again
    again = cli.ok("pull", wid, out)
    assert "downloaded 1, kept 29" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "7.png"} == \
        {k: v for k, v in mtimes.items() if k != "7.png"}
    assert "downloaded 0, kept 30" in cli.ok("pull", wid, out).stderr

    resumed = cli.ok("push", tmp_path / "frames", "--workload", wid)  # a re-run sends nothing
    assert "pushed 0 images" in resumed.stderr and "30 already there" in resumed.stderr
    other = frames_dir(tmp_path / "other", 2)  # other frames into the same ids: refused, not mixed in
    Image.new("RGB", (64, 64), "white").save(other[0])
    one_line_error(cli("push", tmp_path / "other", "--workload", wid), 1, "image 0", "already exists with other content",
                   alone=False)


def test_video_run_gives_the_grayscale_of_each_frame(cli: Cli, tmp_path):
    clip, result = tmp_path / "clip.mp4", tmp_path / "gray.mp4"
    cli.ok("video", "sample", clip, "--seconds", "3", "--fps", "12")
    r = cli.ok("video", "run", clip, result, "--filter", "grayscale", "--jobs", "3")
    assert "wrote" in r.stderr

    src, out = video.probe(clip), video.probe(result)
    assert (out.width, out.height, out.fps) == (src.width, src.height, src.fps) == (320, 240, 12)
    before, after = list(video.frames(clip)), list(video.frames(result))
    assert len(before) == len(after) == 36
    for i, (a, b) in enumerate(zip(before, after)):
        gray = a.convert("L")
        own = ImageStat.Stat(ImageChops.difference(gray, b.convert("L"))).mean[0]
        assert own < 3, f"frame {i} differs from the grayscale of its source by {own:.1f}"
        for j in (i - 1, i + 1):  # and it is that frame, not a neighbour
            if 0 <= j < len(after):
                assert own < ImageStat.Stat(ImageChops.difference(gray, after[j].convert("L"))).mean[0]
        r_, g_, b_ = b.split()
        chroma = max(ImageStat.Stat(ImageChops.difference(r_, g_)).mean[0],
                     ImageStat.Stat(ImageChops.difference(g_, b_)).mean[0])
        assert chroma < 2, f"frame {i} is not gray (mean channel difference {chroma:.1f})"


def test_video_pull_joins_at_the_source_rate(cli: Cli, tmp_path):
    clip = tmp_path / "clip.mkv"
    cli.ok("video", "sample", clip, "--seconds", "1", "--fps", "8")
    wid = cli.ok("video", "push", clip, "--filter", "blur").stdout.strip()
    cli.ok("watch", wid)
    cli.ok("video", "pull", wid, tmp_path / "blurred.mp4")
    info = video.probe(tmp_path / "blurred.mp4")
    assert (info.fps, info.width, info.height) == (8, 320, 240)
    assert len(list(video.frames(tmp_path / "blurred.mp4"))) == 8


def test_watch_fails_when_images_fail(cli: Cli, system, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (64, 64), "red").save(bad / "0.png")
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), "blue").save(buf, "PNG")
    (bad / "1.png").write_bytes(buf.getvalue()[:200])  # a valid header, a truncated body
    wid = cli.ok("push", bad).stdout.strip()
    one_line_error(cli("watch", wid), 1, "1 of 2 images failed", "image 1", alone=False)
    r = cli("pull", wid, tmp_path / "got", "--wait")  # what succeeded is there, the exit code tells
    one_line_error(r, 1, "1 of 2 images failed", alone=False)
    assert [p.name for p in (tmp_path / "got").iterdir()] == ["0.png"]


@pytest.mark.parametrize("args", [
    ("status",), ("workers",), ("workloads",), ("watch", "x"), ("pull", "x", "out"),
    ("push", "frames"), ("video", "push", "in.mp4"), ("video", "pull", "x", "out.mp4"),
    ("video", "run", "in.mp4", "out.mp4"),
])
def test_commands_need_a_login(system, tmp_path, args):
    frames_dir(tmp_path / "frames", 1)
    r = subprocess.run([DPIP, *args], env=clean_env(XDG_CONFIG_HOME=str(tmp_path / "empty")),
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    one_line_error(r, 3, "not logged in")


def test_error_paths_exit_non_zero_with_one_line(cli: Cli, system, tmp_path):
    one_line_error(cli("login", "--user", "admin", DPIP_PASSWORD="wrong"), 3, "wrong user or password")
    one_line_error(cli("login", "--user", "nobody"), 3, "wrong user or password")
    unknown = "00000000-0000-0000-0000-000000000000"
    for args in (("watch", unknown), ("pull", unknown, tmp_path / "o"), ("video", "pull", unknown, tmp_path / "o.mp4"),
                 ("push", frames_dir(tmp_path / "f", 1)[0], "--workload", unknown)):
        one_line_error(cli(*args), 1, "not found")
    one_line_error(cli("push", tmp_path / "missing"), 1, "no such file")
    one_line_error(cli("video", "push", tmp_path / "f" / "notes.txt"), 1, "cannot open as a video")
    one_line_error(cli("video", "run", tmp_path / "f" / "0.png", tmp_path / "out.xyz"), 1, "unknown video extension")
    one_line_error(cli("push", tmp_path / "f", "--name", "bad name!"), 1, "workload_name")
    one_line_error(cli("status", DPIP_TOKEN="not-a-token"), 3, "dpip login")
    one_line_error(cli("push", tmp_path / "f", "--filter", "resize(width=0)|grayscale"), 1,
                   "step 1 (resize): width must be between 1 and 10000")

    dead = f"http://127.0.0.1:{free_port()}"
    one_line_error(cli("status", DPIP_URL=dead, DPIP_TOKEN="t"), 4, "cannot reach the server")
    one_line_error(cli("login", "--url", dead), 4, "cannot reach the server")
    one_line_error(cli("video", "run", tmp_path / "none.mp4", tmp_path / "o.mp4", DPIP_URL=dead, DPIP_TOKEN="t"),
                   1, "none.mp4")
    # the saved token goes only to the server that issued it
    one_line_error(cli("status", "--url", dead), 3, f"not logged in to {dead}")
    one_line_error(cli("workers", DPIP_URL=dead), 3, "not logged in")
    one_line_error(cli("video", "run", tmp_path / "none.mp4", tmp_path / "o.mp4", "--codec", "nope"), 1,
                   "no 'nope' encoder")
    one_line_error(cli("video", "pull", unknown, tmp_path / "o.mp4", "--codec", "aac"), 1, "not a video encoder")


def test_logout_revokes_and_forgets(cli: Cli, tmp_path):
    token = json.loads((cli.home / "dpip" / "config.json").read_text())["token"]
    cli.ok("logout")
    assert json.loads((cli.home / "dpip" / "config.json").read_text())["token"] == ""
    one_line_error(cli("status"), 3, "not logged in")
    one_line_error(cli("status", DPIP_TOKEN=token), 3, "revoked")


def test_ctrl_c_stops_cleanly(cli: Cli, tmp_path):
    request = urllib.request.Request(f"{cli.url}/workloads", method="POST",
                                     headers={"Authorization": f"Bearer {_token(cli)}"})
    with urllib.request.urlopen(request) as resp:  # no images: it never completes
        wid = json.load(resp)["workload_id"]
    def polls() -> float:  # the server's count of workload views: what `dpip watch` asks for
        return metric(cli.url, "dpip_http_requests_total", route="/workloads/{workload_id}", method="GET")

    before = polls()
    proc = subprocess.Popen([DPIP, "watch", wid], env=cli.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # Watching for real (it has asked the server at least once), not still starting up.
        wait_until(lambda: polls() > before or proc.poll() is not None, 30, "dpip watch to poll the workload")
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "dpip: interrupted"


def _token(cli: Cli) -> str:
    return json.loads((cli.home / "dpip" / "config.json").read_text())["token"]


# -- pure parts -----------------------------------------------------------------------------

def test_natural_order_and_collect(tmp_path):
    names = ["10.png", "2.png", "1.png", "frame-3.png", "frame-20.png"]
    assert sorted(names, key=lambda n: natural_key(Path(n))) == ["1.png", "2.png", "10.png", "frame-3.png", "frame-20.png"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "readme.md").write_text("skip me")
    assert [p.name for p in collect([tmp_path])] == ["1.png", "2.png", "10.png", "frame-3.png", "frame-20.png"]


def test_saved_session_is_private_even_with_a_loose_umask(tmp_path, monkeypatch):
    monkeypatch.setenv("DPIP_CONFIG_DIR", str(tmp_path / "cfg"))
    old = os.umask(0)
    try:
        path = save(Session("http://x", "u", "secret"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_rm_deletes_workloads_by_id_or_name(cli: Cli, system, tmp_path):
    first = cli.ok("push", frames_dir(tmp_path / "a", 2)[0], "--name", "to-remove").stdout.strip()
    second = cli.ok("push", frames_dir(tmp_path / "b", 2)[0]).stdout.strip()
    r = cli.ok("rm", "to-remove", second)
    assert r.stdout.count("deleted ") == 2 and "to-remove" in r.stdout
    listed = [w["workload_id"] for w in json.loads(cli.ok("workloads", "--json").stdout)]
    assert first not in listed and second not in listed
    one_line_error(cli("rm", "no-such-name"), 1, "no workload of yours is named 'no-such-name'")
    one_line_error(cli("rm", first), 1, "not found")


def test_a_pipeline_from_the_command_line_and_the_fleets_filters(cli: Cli, system, tmp_path):
    files = frames_dir(tmp_path / "frames", 2)
    wid = cli.ok("push", tmp_path / "frames", "--filter", "resize(width=16)|flip|grayscale").stdout.strip()
    out = tmp_path / "out"
    cli.ok("pull", wid, out, "--wait")
    for i, src in enumerate(files):
        with Image.open(out / f"{i}.png") as got, Image.open(src) as original:
            w, h = original.size
            want = original.resize((16, round(h * 16 / w)), Image.Resampling.LANCZOS)
            want = want.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("L")
            assert got.tobytes() == want.tobytes(), i
    listed = json.loads(cli.ok("filters", "--json").stdout)
    assert {"resize", "flip", "grayscale"} <= {f["name"] for f in listed}
    assert all(f["workers"] == 2 for f in listed if f["builtin"]), "both workers run every built-in"
    table = cli.ok("filters").stdout
    assert "resize" in table and "flip" in table
