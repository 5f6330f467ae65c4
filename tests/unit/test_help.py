"""Every `vmbatch` command's --help reads like a man page: what it does, an example, and
its exit status (issue 17: "man-page-quality --help for every command")."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from vmbatch import cli


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, cmd in sorted(group.commands.items()):
        path = (*prefix, name)
        if isinstance(cmd, click.Group):
            found += _commands(cmd, path)
        else:
            found.append(path)
    return found


COMMANDS = _commands(cli.cli)


def test_the_commands_are_found() -> None:
    assert ("run",) in COMMANDS and ("image", "pull") in COMMANDS and len(COMMANDS) >= 10


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_has_an_example_and_the_exit_status(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli.cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "Example" in text, f"vmbatch {' '.join(path)} --help shows no example"
    assert "Exit status" in text, f"vmbatch {' '.join(path)} --help names no exit status"
    cmd: click.Command = cli.cli
    for name in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    for param in cmd.params:
        if isinstance(param, click.Option) and not param.hidden and param.name != "help":
            assert param.help, f"vmbatch {' '.join(path)} {param.opts[0]} has no help text"


def test_the_top_level_help_lists_the_exit_codes() -> None:
    text = CliRunner().invoke(cli.cli, ["--help"]).output
    for code in ("65", "69", "70", "75"):
        assert f"  {code}  " in text
