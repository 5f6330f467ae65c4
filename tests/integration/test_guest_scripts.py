"""The sh that vmbatch generates for the guest, run with the host's sh and busybox sh."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmbatch.guest.session import command_script

SHELLS = [["sh", "-c"]] + ([["busybox", "sh", "-c"]] if shutil.which("busybox") else [])


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_command_script_runs_argv_exactly(shell: list[str], tmp_path: Path) -> None:
    script = command_script(("printf", "%s\\n", "$(touch x)", "a b")).decode()
    run = subprocess.run([*shell, script], capture_output=True, cwd=tmp_path, check=False)
    assert (run.returncode, run.stdout) == (0, b"$(touch x)\na b\n")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_command_script_says_a_missing_command_is_not_in_the_vm(
    shell: list[str], tmp_path: Path
) -> None:
    for argv in (("no-such-cmd-x", "$(touch x)"), ("./missing", "a")):
        script = command_script(argv)
        run = subprocess.run([*shell, script], capture_output=True, cwd=tmp_path, check=False)
        assert run.returncode == 127
        assert run.stderr == f"vmbatch: {argv[0]}: command not found in the job's VM\n".encode()
        assert not (tmp_path / "x").exists()
