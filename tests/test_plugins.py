"""Filters from installed packages, end to end: the example plugin (examples/dpip-vignette) is
pip-installed into one worker's environment only; the server does not have it. Its jobs go
only there, wait with a reason while that worker is away, and its parameters are checked
against that worker's declaration. A broken plugin costs its own filters, never a process."""

from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from filtering import kernels, model, pipeline
from tests.helpers import (
    ADMIN_PASSWORD,
    ROOT,
    LocalSystem,
    frame_png,
    job_rows,
    push,
    ref,
    view,
    wait_completed,
    wait_until,
)


def pip_install(source: Path, target: Path, work: Path) -> Path:
    """``pip install --target`` of a plugin's source tree (copied first: the build writes beside
    it), offline, as an operator installs a plugin next to a worker."""
    copy = work / f"src-{source.name}"
    shutil.copytree(source, copy)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(copy)], check=True, cwd=work)
    return target


@pytest.fixture(scope="module")
def plugin_dirs(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("plugins")
    return {"vignette": pip_install(ROOT / "examples" / "dpip-vignette", work / "vignette", work),
            "broken": pip_install(ROOT / "tests" / "plugins" / "dpip-broken", work / "broken", work),
            "legacy": pip_install(ROOT / "tests" / "plugins" / "dpip-legacy", work / "legacy", work)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, plugin_dirs):
    """A server without the plugin; ``plain`` without it; ``artist`` with it (and the broken one)."""
    base = tmp_path_factory.mktemp("fleet")
    sysm = LocalSystem(base / "data", log_dir=base / "logs", admin_password=ADMIN_PASSWORD)
    with sysm:
        sysm.start_server()
        sysm.start_worker("plain")
        start_artist(sysm, plugin_dirs)
        sysm.wait_workers({"plain", "artist"})
        yield sysm


def start_artist(sysm: LocalSystem, plugin_dirs: dict[str, Path]) -> None:
    path = f"{plugin_dirs['broken']}:{plugin_dirs['vignette']}"
    sysm.start_worker("artist", env={"PYTHONPATH": path})


def vignette_module(plugin_dirs: dict[str, Path]):
    """The installed plugin's own code, to compute the expected pixels with."""
    spec = importlib.util.spec_from_file_location("dpip_vignette_expected", plugin_dirs["vignette"] / "dpip_vignette.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fleet_view_says_which_worker_runs_the_plugin(fleet):
    token = fleet.login()
    public = {f["name"]: f for f in ref.request(fleet.url, "GET", "/filters").json()}
    assert "vignette" not in public, "workers' plugins: for users only (an anonymous listing stays small)"
    assert "offered_by" not in public["grayscale"], "which workers: for users only"
    named = {f["name"]: f for f in ref.get_json(fleet.url, token, "/filters")}
    assert named["vignette"]["workers"] == 1 and named["vignette"]["on_server"] is False
    assert {"explodes", "stray"}.isdisjoint(named), "the broken plugin's entries are skipped"
    assert named["vignette"]["offered_by"] == [{"worker": "artist", "version": "1.2.0", "gpu": False}]
    assert [p["name"] for p in named["vignette"]["params"]] == ["strength", "radius"]
    assert sorted(w["worker"] for w in named["grayscale"]["offered_by"]) == ["artist", "plain"]
    workers = {w["name"]: w for w in ref.get_json(fleet.url, token, "/status")["workers"]}
    assert "vignette" in workers["artist"]["filters"] and workers["artist"]["filter_versions"] == {"vignette": "1.2.0"}
    assert "vignette" not in workers["plain"]["filters"] and workers["plain"]["filter_versions"] == {}
    assert set(workers["plain"]["filters"]) == {f for f, d in public.items() if d["builtin"]}


def test_plugin_jobs_go_only_to_the_worker_that_has_it(fleet, plugin_dirs):
    token = fleet.login()
    wid = workload(fleet, token, "vignette(strength=0.8)|grayscale")
    assert view(fleet.url, token, wid)["steps"] == [{"name": "vignette", "params": {"strength": 0.8, "radius": 0.75}},
                                                    {"name": "grayscale", "params": {}}]
    frames = {i: frame_png(i, 96, 64) for i in range(8)}
    push(fleet, token, wid, frames)
    done = wait_completed(fleet.url, token, wid)
    assert done["failed_images"] == [] and done["filtered_images"] == list(range(8))
    assert {row[3] for row in job_rows(fleet, wid)} == {"artist"}, "never the worker without the plugin"
    kernel = vignette_module(plugin_dirs).vignette
    for i, data in frames.items():
        got = Image.open(io.BytesIO(ref.pull(fleet.url, token, wid, i).body))
        expected = kernel.apply(Image.open(io.BytesIO(data)), {"strength": 0.8, "radius": 0.75}).convert("L")
        assert got.tobytes() == expected.tobytes(), f"image {i}"


def test_parameters_are_checked_against_the_workers_declaration(fleet):
    token = fleet.login()
    before = len(ref.get_json(fleet.url, token, "/workloads"))
    for text, words in (("vignette(strength=5)", "step 1 (vignette): strength must be between 0 and 1"),
                        ("grayscale|vignette(colour=red)", "step 2 (vignette) takes no parameter 'colour'"),
                        ("explodes", "unknown filter 'explodes'")):
        r = ref.request(fleet.url, "POST", "/workloads", f"filter={text}".encode(), form(token))
        assert r.status == 400 and words in r.json()["error"], r.body
    assert len(ref.get_json(fleet.url, token, "/workloads")) == before, "nothing created"


def test_without_its_worker_a_plugin_job_waits_saying_why_then_runs(fleet, plugin_dirs):
    token = fleet.login()
    wid = workload(fleet, token, "vignette")
    fleet.stop_worker("artist")
    wait_until(lambda: "artist" not in fleet.alive_workers(token), 30, "artist to be gone")
    frames = {i: frame_png(i, 40, 30) for i in range(3)}
    push(fleet, token, wid, frames)
    waiting = wait_until(lambda: (v := view(fleet.url, token, wid))["waiting_reason"] and v, 30, "a reason")
    assert waiting["waiting_reason"] == "waiting for a live worker that runs filter vignette"
    assert waiting["failed_images"] == [] and waiting["status"] != "completed"
    assert {row[1] for row in job_rows(fleet, wid)} == {"queued"}, "the plain worker takes none of them"
    r = ref.request(fleet.url, "POST", "/workloads", b"filter=vignette", form(token))
    assert r.status == 400 and "no live worker offers it" in r.json()["error"], "a new one is refused meanwhile"
    start_artist(fleet, plugin_dirs)
    done = wait_completed(fleet.url, token, wid)
    assert done["filtered_images"] == [0, 1, 2] and {row[3] for row in job_rows(fleet, wid)} == {"artist"}


def test_a_broken_plugin_is_one_line_and_the_rest_loads(plugin_dirs):
    path = f"{plugin_dirs['broken']}:{plugin_dirs['vignette']}"
    code = "from filtering import registry; print('\\n'.join(registry.load_plugins())); print(sorted(registry.REGISTRY))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    problems, names = out[:-1], eval(out[-1])
    assert len(problems) == 2
    assert "plugin explodes (dpip_broken_import:explode) failed to import, skipped: ImportError" in problems[0]
    assert "plugin stray (dpip_broken_stray:value) is not a filter" in problems[1]
    assert "vignette" in names and "explodes" not in names and "stray" not in names


def test_a_plugin_on_the_old_import_path_loads_with_one_deprecation_line(plugin_dirs):
    """Plugins written against common.filters keep loading for a release, told of dpip.filters."""
    code = ("import logging; logging.basicConfig(); from filtering import registry; registry.load_plugins();"
            " from PIL import Image; out = registry.spec('posterize').apply(Image.new('RGB', (2, 2), (200, 100, 50)),"
            " {'bits': 1}); print(out.getpixel((0, 0)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(plugin_dirs["legacy"]),
                          "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "(128, 0, 0)"
    lines = [ln for ln in done.stderr.splitlines() if "deprecated" in ln]
    assert len(lines) == 1 and "import the same names from dpip.filters" in lines[0], done.stderr


def test_a_server_with_a_broken_plugin_still_serves(tmp_path, plugin_dirs):
    sysm = LocalSystem(tmp_path / "data", log_dir=tmp_path / "logs", admin_password=ADMIN_PASSWORD,
                       server_env={"PYTHONPATH": f"{plugin_dirs['broken']}:{plugin_dirs['vignette']}"})
    with sysm:
        sysm.start_server()
        listed = {f["name"]: f for f in ref.request(sysm.url, "GET", "/filters").json()}
        assert listed["vignette"]["on_server"] and listed["vignette"]["workers"] == 0
        sysm.start_worker("w")  # without the plugin: the server's own copy does not make w run it
        token = sysm.login()
        sysm.wait_workers({"w"}, token)
        wid = workload(sysm, token, "vignette")
        push(sysm, token, wid, {0: frame_png(0, 20, 20)})
        reason = wait_until(lambda: view(sysm.url, token, wid)["waiting_reason"], 30, "a reason")
        assert reason == "waiting for a live worker that runs filter vignette"


def test_the_example_plugin_is_a_kernel_that_runs_with_numpy(plugin_dirs):
    module = vignette_module(plugin_dirs)
    spec = module.vignette
    assert isinstance(spec, model.FilterSpec) and spec.gpu, "an array kernel: on a GPU where there is one"
    import numpy
    im = Image.new("RGBA", (33, 21), (200, 150, 100, 77))
    out = kernels.run_kernel(spec.kernel, im, {"strength": 1.0, "radius": 0.5}, xp=numpy)
    assert out.mode == "RGBA" and out.getpixel((16, 10)) == (200, 150, 100, 77), "the centre is untouched"
    assert out.getpixel((0, 0)) == (0, 0, 0, 77), "a corner goes black, its alpha kept"
    assert pipeline.validate([("vignette", {})], lambda n: spec, list).steps[0].params == {"strength": 0.5,
                                                                                          "radius": 0.75}


def form(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/x-www-form-urlencoded"}


def workload(sysm: LocalSystem, token: str, text: str) -> str:
    r = ref.request(sysm.url, "POST", "/workloads", f"filter={text}".encode(), form(token))
    assert r.status == 200, r.body
    return r.json()["workload_id"]
