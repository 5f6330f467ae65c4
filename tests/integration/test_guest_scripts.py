"""The sh that vmbatch generates for the guest, run with the host's sh and busybox sh."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.shells import SHELLS as ALL_SHELLS
from vmbatch.guest.session import command_script

SHELLS = [[*argv, "-c"] for name, argv in ALL_SHELLS.items() if name != "bash"]


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: " ".join(s[:-1]))
def test_command_script_runs_argv_exactly(shell: list[str], tmp_path: Path) -> None:
    script = command_script(("printf", "%s\\n", "$(touch x)", "a b")).decode()
    run = subprocess.run([*shell, script], capture_output=True, cwd=tmp_path, check=False)
    assert (run.returncode, run.stdout) == (0, b"$(touch x)\na b\n")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: " ".join(s[:-1]))
def test_command_script_says_a_missing_command_is_not_in_the_vm(
    shell: list[str], tmp_path: Path
) -> None:
    for argv in (("no-such-cmd-x", "$(touch x)"), ("./missing", "a")):
        script = command_script(argv)
        run = subprocess.run([*shell, script], capture_output=True, cwd=tmp_path, check=False)
        assert run.returncode == 127
        assert run.stderr == f"vmbatch: {argv[0]}: command not found in the job's VM\n".encode()
        assert not (tmp_path / "x").exists()


SRUN = Path(__file__).resolve().parents[2] / "vmbatch" / "guest" / "srun.sh"


def _srun(shell: list[str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """vmbatch's srun run by ``shell`` (its argv without the trailing ``-c``)."""
    return subprocess.run(
        [*shell[:-1], str(SRUN), *args], capture_output=True, text=True, cwd=cwd, check=False
    )


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: " ".join(s[:-1]))
def test_guest_srun_runs_ntasks_copies_here_with_the_worst_status(
    shell: list[str], tmp_path: Path
) -> None:
    task = 'echo "task $SLURM_PROCID of $SLURM_NTASKS"; exit $SLURM_PROCID'
    r = _srun(shell, "-n", "3", "--mem=1G", "-c2", "sh", "-c", task, cwd=tmp_path)
    assert sorted(r.stdout.splitlines()) == [f"task {i} of 3" for i in range(3)]
    assert r.returncode == 2
    r = _srun(shell, "-D", str(tmp_path), "--", "pwd", cwd=Path("/"))
    assert (r.returncode, r.stdout) == (0, f"{tmp_path}\n")
    r = _srun(shell, "echo", "a", "-n", "2", cwd=tmp_path)  # options after the command are its
    assert (r.returncode, r.stdout) == (0, "a -n 2\n")


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: " ".join(s[:-1]))
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("-N", "2", "hostname"), "runs on its node only (-N 2)"),
        (("--pty", "bash"), "--pty needs a terminal"),
        (("-o", "out", "true"), "use the shell's redirections"),
        (("--frobnicate", "true"), "option --frobnicate is not supported"),
        (("-n", "x", "true"), "needs a number from 1 to 999"),
        (("-n",), "option -n needs a value"),
        ((), "no command given"),
    ],
)
def test_guest_srun_refuses_what_one_vm_cannot_do(
    shell: list[str], args: tuple[str, ...], says: str, tmp_path: Path
) -> None:
    r = _srun(shell, *args, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("vmbatch: srun: ") and says in r.stderr, r.stderr


def test_guest_srun_says_a_missing_command_is_not_in_the_vm(tmp_path: Path) -> None:
    r = _srun(SHELLS[0], "-n", "2", "no-such-cmd-x", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (
        127,
        "vmbatch: no-such-cmd-x: command not found in the job's VM\n",
    )
