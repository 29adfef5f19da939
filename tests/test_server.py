"""The composition root and the settings: flags built from the settings' fields, a failed
start that unwinds what it opened, and errors that always leave as JSON."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from api.keys import IMAGES, STORE
from common.models import DpipError
from server.services import build_app
from server.settings import ServerSettings, parse_server_args
from tests.helpers import ROOT, clean_env, free_port


def test_defaults_come_from_the_settings_and_every_field_has_its_flag():
    settings, level = parse_server_args([])
    assert settings == ServerSettings() and level == "INFO"
    given = parse_server_args(["--port", "9", "--no-fsync", "--access-log", "--autoscale", "1:3",
                               "--trusted-proxy", "10.0.0.0/8", "--hedge", "tied", "--data-dir", "/x"])[0]
    assert (given.port, given.fsync, given.access_log, given.autoscale, given.hedge, given.data_dir) == \
        (9, False, True, (1, 3), "tied", Path("/x"))
    assert [str(n) for n in given.trusted_proxies] == ["10.0.0.0/8"]
    flagless = {f.name for f in dataclasses.fields(ServerSettings) if f.metadata.get("help") is None}
    assert flagless == {"system_name"}


def test_every_flag_reads_its_environment_variable(monkeypatch):
    monkeypatch.setenv("DPIP_CONTROLLER_PORT", "41000")
    monkeypatch.setenv("DPIP_TRUSTED_PROXY", "127.0.0.1")
    monkeypatch.setenv("DPIP_AUTOSCALE", "0:2")
    s = parse_server_args([])[0]
    assert s.controller_port == 41000 and s.autoscale == (0, 2) and len(s.trusted_proxies) == 1
    assert parse_server_args(["--controller-port", "5"])[0].controller_port == 5  # the flag wins


@pytest.mark.parametrize("argv, words", [
    (["--autoscale", "x"], "MIN:MAX"),
    (["--trusted-proxy", "nonsense"], "not an address"),
    (["--hedge", "sometimes"], "invalid choice"),
    (["--scale-up-cmd", "x"], "go together"),
])
def test_bad_flags_say_what_is_wrong(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        parse_server_args(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


async def test_a_failed_start_unwinds_what_it_opened(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = ServerSettings(port=free_port(), controller_port=taken.getsockname()[1],
                                  data_dir=tmp_path / "data", admin_password="pw-12345678", fsync=False)
        app = build_app(settings)
        runner = web.AppRunner(app)
        with pytest.raises(Exception):
            await runner.setup()  # the controller port is in use
        await runner.cleanup()
    assert app[STORE]._db is None, "the datastore was closed"
    assert app[IMAGES]._thumb_pool._shutdown, "the image store's threads were stopped"


def test_the_server_exits_naming_a_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "main.py", "--port", str(port), "--controller-port", str(free_port()),
             "--data-dir", str(tmp_path / "data")],
            cwd=ROOT, env=clean_env(DPIP_ADMIN_PASSWORD="pw-12345678"), capture_output=True, text=True,
            timeout=60)
    assert proc.returncode != 0 and str(port) in proc.stderr


async def test_an_unmapped_error_is_a_json_500_with_a_request_id(aiohttp_client, settings, caplog):
    app = build_app(settings)

    async def bug(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    async def unmapped(request: web.Request) -> web.Response:
        raise DpipError("an error class with no status of its own")

    app.router.add_get("/bug", bug)
    app.router.add_get("/unmapped", unmapped)
    client = await aiohttp_client(app)
    for path in ("/bug", "/unmapped"):
        r = await client.get(path)
        body = await r.json()
        assert r.status == 500 and body["error"] == "internal server error"
        assert body["request_id"] in caplog.text, "the id finds the traceback in the log"
