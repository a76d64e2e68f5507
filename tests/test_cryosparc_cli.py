"""`deephemnma cryosparc`: missing address or credentials, refused connections and server
failures end in one clear line (exit code 2), never in a cryosparc-tools traceback."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from deephemnma_bridge.cli import main as cli_main
from deephemnma_bridge.errors import InputError

ENV = (
    "CRYOSPARC_BASE_URL",
    "CRYOSPARC_MASTER_HOSTNAME",
    "CRYOSPARC_BASE_PORT",
    "CRYOSPARC_EMAIL",
    "CRYOSPARC_PASSWORD",
    "CRYOSPARC_LICENSE_ID",
)


@pytest.fixture
def no_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No cryoSPARC variables and no stored session (an empty config folder)."""
    for key in ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(tmp: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    argv = ["cryosparc", "--project", "P1", "--job", "J2", "--workspace", "W1"]
    code = cli_main([*argv, "--work", str(tmp / "work"), "--modes", "m.npz", *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("deephemnma cryosparc: error: ")
    return code, lines[0]


def test_no_server_given(no_login: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _run(no_login, capsys)
    assert code == 2
    assert "no cryoSPARC server given" in line and "CRYOSPARC_BASE_URL" in line
    assert "--url" in line


def test_no_login_for_the_server(
    no_login: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("CRYOSPARC_BASE_URL", url)
    code, line = _run(no_login, capsys)
    assert code == 2
    assert f"no cryoSPARC login for {url}" in line
    assert "CRYOSPARC_EMAIL and CRYOSPARC_PASSWORD" in line
    assert f"python -m cryosparc.tools login --url {url}" in line


def test_unreachable_server(
    no_login: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _closed_port()
    monkeypatch.setenv("CRYOSPARC_PASSWORD", "secret")
    code, line = _run(
        no_login, capsys, "--url", f"http://127.0.0.1:{port}/browse", "--email", "a@b.org"
    )
    assert code == 2
    assert f"cannot connect to cryoSPARC at http://127.0.0.1:{port} (" in line
    assert "refused" in line.lower()
    assert "secret" not in line


def test_server_failure_during_the_run(
    no_login: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Down:
        def find_project(self, uid: str) -> Any:
            raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr("deephemnma_bridge.cli.cryosparc.connect", lambda *a, **k: Down())
    code, line = _run(no_login, capsys)
    assert code == 2
    assert "cryoSPARC P1: the server call failed" in line and "reset by peer" in line


def test_connection_settings() -> None:
    from deephemnma_bridge.adapters.cryosparc_online import connection_settings

    env = {"CRYOSPARC_BASE_URL": "http://cs:39000", "CRYOSPARC_EMAIL": "a@b"}
    kw = connection_settings(environ=env, tools_version="5.0.3")
    assert kw["base_url"] == "http://cs:39000" and kw["host"] is None
    assert kw["email"] == "a@b" and kw["password"] is None
    # the command line wins over the environment; host + port without a URL
    kw = connection_settings(url="cs2:40000", email="c@d", environ=env, tools_version="5.0")
    assert kw["base_url"] == "http://cs2:40000" and kw["email"] == "c@d"
    kw = connection_settings(
        environ={"CRYOSPARC_MASTER_HOSTNAME": "h", "CRYOSPARC_BASE_PORT": "39100"},
        tools_version="5.0",
    )
    assert (kw["base_url"], kw["host"], kw["base_port"]) == (None, "h", 39100)
    with pytest.raises(InputError, match="CRYOSPARC_BASE_PORT must be a port number"):
        connection_settings(environ={"CRYOSPARC_BASE_PORT": "web"}, tools_version="5.0")
    with pytest.raises(InputError, match="not a web address"):
        connection_settings(url="http://cs:port", environ={}, tools_version="5.0")
    # cryosparc-tools 4.x needs a license, an email and a password
    with pytest.raises(InputError) as info:
        connection_settings(environ=env, tools_version="4.6.1")
    assert "CRYOSPARC_LICENSE_ID" in str(info.value) and "CRYOSPARC_PASSWORD" in str(info.value)
    assert "CRYOSPARC_EMAIL" not in str(info.value)
    full = {**env, "CRYOSPARC_LICENSE_ID": "lic", "CRYOSPARC_PASSWORD": "pw"}
    kw = connection_settings(environ=full, tools_version="4.6.1")
    assert kw == {
        "license": "lic",
        "host": "cs",
        "base_port": 39000,
        "email": "a@b",
        "password": "pw",
    }
