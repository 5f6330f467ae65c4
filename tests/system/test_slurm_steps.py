"""Issue 15: Slurm job steps (``srun``, ``salloc`` + ``srun``) run in the job's VM.

The cluster is set up as docs/admin-slurm.md says, with ``cli_filter.lua`` giving every
``srun`` step vmbatch's bundle; the user types plain ``srun``/``salloc`` commands.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.system.conftest import SlurmSite

MARKER = "cryptomgr.notests"  # on the tiny guest's kernel command line, not the host's


def _ended(slurm: SlurmSite, count: int, timeout: float = 120) -> list[dict[str, object]]:
    """The accounting records once ``count`` jobs ended and their Epilogs left nothing."""
    deadline = time.monotonic() + timeout
    while len(slurm.bs.records()) < count or slurm.bs.leftovers():
        assert time.monotonic() < deadline, (slurm.bs.records(), slurm.bs.leftovers())
        time.sleep(0.2)  # polling with a deadline
    return slurm.bs.records()


def test_srun_runs_its_command_in_the_jobs_vm_with_the_exit_status(slurm: SlurmSite) -> None:
    r = slurm.srun("sh", "-c", "cat /proc/cmdline; id -u; echo to-stderr >&2; exit 3")
    out = r.stdout.decode()
    assert MARKER in out and MARKER not in Path("/proc/cmdline").read_text(), r
    assert f"\n{slurm.user.uid}\n" in out and b"to-stderr" in r.stderr, r
    assert r.returncode == 3, r
    (record,) = _ended(slurm, 1)
    assert record["exit_status"] == 3, record

    missing = slurm.srun("no-such-command", "x")
    assert missing.returncode == 127, missing
    assert b"vmbatch: no-such-command: command not found in the job's VM" in missing.stderr


def test_srun_with_more_tasks_than_nodes_is_refused_with_a_reason(slurm: SlurmSite) -> None:
    r = slurm.srun("-n", "2", "hostname")
    assert r.returncode != 0 and b"one task per node in the job's VM" in r.stderr, r
    assert not slurm.bs.records()  # refused before any job or VM


def test_steps_of_one_salloc_share_the_jobs_vm(slurm: SlurmSite) -> None:
    """Two steps of one allocation, one after the other, both in the job's one VM: the
    first leaves a file in the guest that the second reads."""
    r = subprocess.run(
        ["runuser", "-u", slurm.user.name, "--", "salloc", "-N1", "sh", "-c",
         "srun sh -c 'echo step1 > /tmp/shared; cat /proc/cmdline';"
         " srun cat /tmp/shared; echo salloc-shell-on=$(hostname)"],
        cwd=slurm.user.home, env=slurm.cluster.env(), capture_output=True, timeout=300,
        check=False,
    )  # fmt: skip
    out = r.stdout.decode()
    assert r.returncode == 0, r
    assert MARKER in out and "step1\n" in out, r
    # salloc's own shell runs where salloc runs, as without vmbatch.
    assert "salloc-shell-on=" in out
    assert _ended(slurm, 1)[0]["exit_status"] == 0
