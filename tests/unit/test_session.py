"""The guest session's generated files and environment rules (no guest needed)."""

from __future__ import annotations

import base64
import re
import shlex

import pytest

from vmbatch.errors import Disposition, JobError
from vmbatch.guest.session import (
    ENV_DENY,
    MAX_ENV_ENTRY,
    command_script,
    guest_dir,
    install_script,
    job_environment,
    start_script,
)


def _exports(text: str) -> dict[str, str]:
    """What sh would export: each ``export NAME=...`` line must be one shell word."""
    env = {}
    words = shlex.split(text, comments=True)
    for i, word in enumerate(words):
        if word == "export":
            name, value = words[i + 1].split("=", 1)
            env[name] = value
    return env


def test_host_only_variables_are_not_passed() -> None:
    env = {"PATH": "/usr/bin", "SSH_AUTH_SOCK": "/tmp/agent", "TMPDIR": "/tmp/job.1", "A": "1"}
    assert job_environment(env) == {"PATH": "/usr/bin", "A": "1"}
    assert job_environment(env, ENV_DENY | {"A"}) == {"PATH": "/usr/bin"}


def test_names_sh_cannot_export_are_dropped() -> None:
    env = {"BASH_FUNC_x%%": "() { :; }", "A-B": "1", "1X": "2", "ok_1": "3"}
    assert job_environment(env) == {"ok_1": "3"}


def test_oversized_environment_is_a_clear_job_error() -> None:
    with pytest.raises(JobError, match="variable BIG is") as info:
        job_environment({"BIG": "x" * MAX_ENV_ENTRY})
    assert info.value.disposition is Disposition.ABORT_JOB
    many = {f"V{i}": "y" * 100_000 for i in range(11)}
    with pytest.raises(JobError, match=r"environment is \d+ bytes"):
        job_environment(many)


@pytest.mark.parametrize(
    "value",
    ["a'b", 'q"q', "$(reboot)", "`id`", "x; exit 9", "line1\nline2", "back\\slash", "", "é"],
)
def test_start_script_quotes_every_value(value: str) -> None:
    text = start_script({"V": value}, None)
    assert _exports(text) == {"V": value}
    assert text.rstrip().endswith('exec "$1/job"')


def test_start_script_changes_to_the_workdir_or_says_why_not() -> None:
    text = start_script({}, "/data/my dir/it's")
    line = next(ln for ln in text.splitlines() if ln.startswith("cd "))
    words = shlex.split(line)
    assert words[:3] == ["cd", "--", "/data/my dir/it's"]
    assert "does not exist in the guest" in line


def test_command_script_runs_argv_exactly() -> None:
    script = command_script(("printf", "%s\n", "$(x)", "a b")).decode()
    assert script.startswith("#!/bin/sh\n")
    assert shlex.split(script, comments=True) == ["exec", "printf", "%s\n", "$(x)", "a b"]


def test_guest_dir_is_one_plain_path_component() -> None:
    assert guest_dir("123.server") == "/var/tmp/vmbatch-123.server"
    for hostile in ("x'; rm -rf /; '/..", "a/b", "$(id)", "a\nb"):
        assert re.fullmatch(r"/var/tmp/vmbatch-[A-Za-z0-9._-]+", guest_dir(hostile))


def test_install_script_carries_every_file_exactly_and_inertly() -> None:
    files = {"job": b"#!/bin/sh\necho '$(x)' `id`\n", "stdin": b"", "bin": bytes(range(256)) * 3}
    text = install_script("/var/tmp/vmbatch-1", files, 60, 5.0).decode("ascii")
    lines = text.split("\n")
    decoded = {}
    i = 0
    while i < len(lines):
        m = re.fullmatch(
            r"base64 -d > /var/tmp/vmbatch-1/(\S+) <<'(VMBATCH-END-OF-FILE)'", lines[i]
        )
        if m:
            end = lines.index(m.group(2), i + 1)
            decoded[m.group(1)] = base64.b64decode("".join(lines[i + 1 : end]))
            i = end
        i += 1
    assert decoded == files
    assert lines[-2] == "exec sh /var/tmp/vmbatch-1/supervisor.sh /var/tmp/vmbatch-1 60 5"
    assert "$(x)" not in text and "`id`" not in text  # contents only as base64
