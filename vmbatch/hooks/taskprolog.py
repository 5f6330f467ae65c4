"""Slurm ``TaskProlog``: refuse a step that would run on the node, outside its job's VM.

slurmstepd runs the TaskProlog as the job's user before each task of every step, of every
job on the node, those without a VM too (slurm.conf(5) "TaskProlog": its ``print ...``
lines reach the task's stdout, a non-zero exit fails the task, "TaskProlog failed"). So
this module imports only the configuration and the user directory's layout, not the
hooks' machinery: a task of a job outside vmbatch's scope pays a fraction of a second, not
the ~0.5 s of importing :mod:`vmbatch.hooks.entry`. Run as
``python -m vmbatch.hooks.taskprolog [--config PATH]`` (``scripts/taskprolog``,
``conf/slurm/taskprolog-chain``) or ``vmbatch-starter slurm-taskprolog``.

A step reaches the VM only if it names a container (``cli_filter.lua``); one that does not
(srun where cli_filter.lua or vmbatch.lua is missing, a client with another slurm.conf, an
srun whose QOS or account the scope could not know) runs in the directory srun gave it,
while a container step's task runs in slurmstepd's copy of the bundle,
``<SlurmdSpoolDir>/oci-job<id>-<step>`` (:mod:`vmbatch.hooks.slurm`), a root-owned
directory the user cannot make. This is a safety net against mistakes, not a barrier: the
TaskProlog runs as the user.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from vmbatch import config
from vmbatch.errors import VmBatchError
from vmbatch.hooks.jobstate import UserDir


def run(path: Path | None, env: Mapping[str, str]) -> int:
    """The TaskProlog's exit status; prints the reason (a ``print`` line) when it refuses."""
    job_id = env.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9]{1,20}", job_id) or in_oci_bundle(Path.cwd(), job_id):
        return 0
    try:
        cfg = config.load(path, as_root=os.geteuid() == 0)
    except VmBatchError:
        return 0  # not for this hook to fail a task over
    if not UserDir(cfg.batch.user_dir, job_id).path.exists():
        return 0  # no VM for this job on this node: outside the scope, or none booted here
    print(
        f"print vmbatch: error: this step of job {job_id} would run on the node, outside the"
        " job's VM: it names no container (srun without vmbatch's cli_filter.lua and"
        " vmbatch.lua, with another slurm.conf, or a new srun job whose QOS or account"
        " vmbatch's scope depends on: name them, or use salloc); start srun where the"
        " site's slurm.conf and cli_filter.lua are (docs/admin-slurm.md)",
        flush=True,
    )
    return 1


def in_oci_bundle(cwd: Path, job_id: str) -> bool:
    """``cwd`` is slurmstepd's bundle copy for a step of ``job_id`` (root's, not writable by
    others: a user cannot make one)."""
    if not re.fullmatch(rf"oci-job0*{re.escape(job_id)}-(\d+|batch|interactive)", cwd.name):
        return False
    try:
        st = cwd.parent.stat()
    except OSError:
        return False
    return st.st_uid == 0 and not st.st_mode & 0o022


def main(argv: Sequence[str] = sys.argv) -> int:
    """``python -m vmbatch.hooks.taskprolog [--config PATH]``. An unexpected exception
    ends it with a traceback and status 1: never success."""
    path = Path(argv[2]) if len(argv) >= 3 and argv[1] == "--config" else None
    return run(path, os.environ)


if __name__ == "__main__":
    sys.exit(main())
