"""The generated ``start``, run by real shells (dash, bash, busybox ash) as the supervisor
runs it (``sh DIR/start DIR``): a missing interpreter names itself and the image, with
status 127; a script whose interpreter exists runs exactly as before."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.shells import SHELLS
from vmbatch.guest.session import start_script

FIX = "vmbatch: install it in the image, or change the script's first line (e.g. #!/bin/sh)"


def _start(
    tmp_path: Path,
    shell: str,
    script: bytes,
    image: str = "demo",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = SHELLS[shell]
    if not Path(argv[0]).exists():
        pytest.skip(f"{argv[0]} is not installed")
    d = tmp_path / "vmbatch-1"
    d.mkdir(exist_ok=True)
    job = d / "job"
    job.write_bytes(script)
    job.chmod(0o700)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"} if env is None else env
    (d / "start").write_text(start_script(env, None, ("arg 1",), image))
    res = subprocess.run(
        [*argv, str(d / "start"), str(d)], env={}, capture_output=True, timeout=30, check=False
    )
    # Decoded by hand: text=True would turn the "\r" of a DOS line into a line break.
    return subprocess.CompletedProcess(
        res.args, res.returncode, res.stdout.decode(), res.stderr.decode()
    )


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "first,missing",
    [
        ("#!/bin/nosuch-bash", "/bin/nosuch-bash"),
        ("#! /opt/nosuch/python3 -u", "/opt/nosuch/python3"),
        ("#!/usr/bin/env nosuch-bash", "nosuch-bash (run by /usr/bin/env, not on the job's PATH)"),
        ("#!/usr/bin/env /opt/nosuch", "/opt/nosuch (run by /usr/bin/env)"),
    ],
)
def test_missing_interpreter_is_named_with_the_image(
    tmp_path: Path, shell: str, first: str, missing: str
) -> None:
    res = _start(tmp_path, shell, f"{first}\necho ran\n".encode(), image="it's tiny")
    assert res.returncode == 127
    assert res.stdout == ""
    assert res.stderr.splitlines() == [
        f"vmbatch: cannot run the job script: its interpreter {missing} is not in image"
        f" 'it's tiny' (first line: {first})",
        FIX,
    ]


@pytest.mark.parametrize("shell", SHELLS)
def test_dos_line_ends_are_pointed_out(tmp_path: Path, shell: str) -> None:
    res = _start(tmp_path, shell, b"#!/bin/sh\r\necho ran\r\n", image="")
    assert res.returncode == 127
    first, fix, _ = res.stderr.split("\n")
    assert first.startswith("vmbatch: cannot run the job script: its interpreter /bin/sh\r is")
    assert "the guest's image" in first
    assert fix.startswith(FIX) and "carriage return" in fix and "dos2unix" in fix


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "script",
    [
        b'#!/bin/sh\necho "ran $1"\n',
        b'#!/usr/bin/env sh\necho "ran $1"\n',
        b'#!/usr/bin/env -S sh -e\necho "ran $1"\n',
        b'echo "ran $1"\n',  # no #!: sh runs it
        b'#!/bin/sh\necho "ran $1"',  # no final newline
        b'#!/bin/sh -e\necho "ran $1"\n',
    ],
)
def test_scripts_whose_interpreter_exists_run_as_before(
    tmp_path: Path, shell: str, script: bytes
) -> None:
    # The job's environment cannot change how the line is read (IFS), nor hide a found
    # program.
    env = {"PATH": "/usr/bin:/bin", "IFS": "/", "l": "x", "dos": "y"}
    res = _start(tmp_path, shell, script, env=env)
    assert (res.returncode, res.stdout, res.stderr) == (0, "ran arg 1\n", "")


@pytest.mark.parametrize("shell", SHELLS)
def test_env_looks_on_the_jobs_path(tmp_path: Path, shell: str) -> None:
    (tmp_path / "bin").mkdir()
    tool = tmp_path / "bin" / "mytool"
    tool.write_text('#!/bin/sh\necho "mytool $1"\n')
    tool.chmod(0o755)
    res = _start(tmp_path, shell, b"#!/usr/bin/env mytool\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("mytool ")
