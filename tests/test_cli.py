"""The ``deephemnma`` dispatcher: listing, help, unknown commands, error reporting."""

from __future__ import annotations

import importlib

import pytest

from deephemnma_bridge import cli


def test_every_listed_command_has_a_module_with_the_contract() -> None:
    names = [name for name, _, _ in cli.COMMANDS]
    assert len(names) == len(set(names))
    for _name, module_name, summary in cli.COMMANDS:
        module = importlib.import_module(f"deephemnma_bridge.cli.{module_name}")
        assert module.__doc__ and summary
        assert callable(module.add_args) and callable(module.main)


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name, _, _ in cli.COMMANDS:
        assert name in out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_each_command_help_works(capsys: pytest.CaptureFixture[str]) -> None:
    for name, _, _ in cli.COMMANDS:
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0
        assert f"deephemnma {name}" in capsys.readouterr().out
