"""Torque: the prologue/epilogue argv, the job starter's stdin, taking the node offline.

Facts relied on (Torque 6 Administrator Guide, "Appendix G: Prologue and Epilogue
Scripts" (argument tables, exit codes) and "$job_starter" in "Node manager (MOM)
configuration"; observed with a real pbs_mom 6.1.3, docs/platform.md):

- prologue: root, argv = job id, user, group, job name, resource list, queue, account,
  job-script copy (``mom_priv/jobs/<id>.SC``); a minimal environment, stdin /dev/null.
  Exit 0 runs the job, 1 aborts it *without delivering its .o/.e* (so the user would never
  see why), any other non-zero requeues it at once (no backoff: a node problem must also
  take the node offline, ``pbsnodes -o``, or the job loops on this node).
- ``$job_starter``: argv = the starter and the user's shell; stdin is an inherited pipe
  holding one line: the script path plus any ``qsub -F`` arguments; the job's full
  environment (``PBS_JOBID``, ...), cwd the user's home. With
  ``$job_starter_run_privileged true`` it starts as root and must become the user.
- epilogue: root, argv = job id, user, group, job name, session id, requested resources,
  used resources, queue, account, exit status, script path. Its exit status is ignored.
  The session id is 0 for a job pbs_mom never started; the exit status is ``ji_exitstat``
  (:mod:`vmbatch.hooks.accounting`).
- ``epilogue.precancel``: on ``qdel`` of a running job, before the job is signalled, as
  the job's user, stdio /dev/null; its failure marks the node down, so it always exits 0,
  and ``qdel`` waits for it, so it gives up after ``[batch].precancel_timeout``.
- The job's cpuset, where pbs_mom makes one, exists before the prologue runs
  (``TMomFinalizeChild`` in src/resmom/start_exec.c of Torque 6.1.3 creates it, then
  ``setup_batch_job`` runs the prologue): built ``--enable-cgroups`` (Torque 6),
  ``<cpuset controller's mount>/torque/<job id>/cpuset.cpus`` (``init_subsystems`` in
  src/resmom/trq_cgroups.c); built ``--enable-cpuset`` (Torque 4/5),
  ``/dev/cpuset/torque/<job id>/cpus`` (``TTORQUECPUSET_PATH``, src/include/pbs_nodes.h;
  ``cpuset.cpus`` where the cpuset file system is the cgroup one). Its CPUs are OS CPU
  numbers. Without either, pbs_mom does not say which CPUs a job has (``exec_host``'s
  ``node/N`` are slot numbers), and the VM is not pinned.
"""

from __future__ import annotations

import logging
import shlex
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from vmbatch import trust
from vmbatch.config import Config
from vmbatch.errors import HostError, JobError
from vmbatch.limits import parse_cpu_list
from vmbatch.process import run as run_command

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EpilogueArgs:
    job_id: str
    user: str
    #: pbs_mom's ``ji_exitstat`` (argv[10]): the job's exit status, 256+N after signal N,
    #: a negative ``JOB_EXEC_*`` code if the job did not start; None if absent or garbled.
    exit_status: int | None
    #: argv[5]: the job's session id, ``0`` if pbs_mom never started it; None if absent.
    session_id: str | None = None


def epilogue_args(argv: Sequence[str]) -> EpilogueArgs:
    """Job id, user, session id and exit status from the epilogue's argv (11 arguments:
    ``run_pelog`` in src/resmom/prolog.c of Torque 6.1 fills argv[1..11])."""
    args = list(argv[1:])
    if len(args) < 2:
        raise JobError(
            f"Torque epilogue: expected 11 arguments (job id, user, ...), got {len(args)}",
            hint="configure it as mom_priv/epilogue; pbs_mom passes the arguments",
        )
    status: int | None = None
    if len(args) >= 10:
        try:
            status = int(args[9])
        except ValueError:
            status = None
    session = args[4] if len(args) >= 5 else None
    return EpilogueArgs(args[0], args[1], status, session)


def starter_command(stdin: BinaryIO) -> tuple[str, tuple[str, ...]]:
    """The job script's path and its ``qsub -F`` arguments from the starter's stdin."""
    line = stdin.readline(65536).decode("utf-8", "surrogateescape").strip()
    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    if not words or not words[0].startswith("/"):
        raise HostError(
            f"the job starter's stdin holds no script path ({line[:80]!r})",
            hint="vmbatch-starter must be pbs_mom's $job_starter (docs/admin-torque.md)",
        )
    return words[0], tuple(words[1:])


def job_id_of_script(path: str) -> str | None:
    """The job id in pbs_mom's script copy's name, ``mom_priv/jobs/<id>.SC``, if it is one."""
    name = PurePosixPath(path).name
    return name[: -len(".SC")] if name.endswith(".SC") and len(name) > 3 else None


def offline_note(note: str) -> str:
    """The note as :func:`offline` sets it."""
    return "".join(c if c.isprintable() else "?" for c in note)[:200]


def offline_by(cfg: Config, node: str, note: str) -> bool | None:
    """Is ``node`` offline with exactly ``note``? None: it is not offline at all.

    ``pbsnodes NODE`` lists ``state = free,offline`` and ``note = TEXT`` (pbsnodes(8)).
    """
    out = run_command([str(cfg.tools.pbsnodes), node], timeout=cfg.tools.command_timeout).stdout
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.strip().partition(" = ")
        if sep:
            fields[key] = value
    if "offline" not in fields.get("state", ""):
        return None
    return fields.get("note") == note


def online(cfg: Config, node: str) -> None:
    """``pbsnodes -c -N "" NODE``: clear OFFLINE and the note."""
    run_command([str(cfg.tools.pbsnodes), "-c", "-N", "", node], timeout=cfg.tools.command_timeout)


def offline(cfg: Config, note: str) -> bool:
    """``pbsnodes -o -N NOTE <this node>``; False (logged) if that failed."""
    clean = offline_note(note)
    node = socket.gethostname()
    try:
        run_command(
            [str(cfg.tools.pbsnodes), "-o", "-N", clean, node],
            timeout=cfg.tools.command_timeout,
        )
    except HostError as exc:
        log.error("could not take node %s offline (%s): %s", node, exc, clean)
        return False
    return True


#: The legacy cpuset file system's conventional mount point (Torque 4/5).
LEGACY_CPUSET = Path("/dev/cpuset")


def cpuset_files(job_id: str, mounts: str) -> list[Path]:
    """Where pbs_mom keeps the job's cpuset, for the cpuset mounts in ``mounts``
    (``/proc/self/mounts``): a cgroup v1 hierarchy with the ``cpuset`` controller, or the
    legacy ``cpuset`` file system (also looked for at /dev/cpuset)."""
    files = []
    bases: list[tuple[Path, tuple[str, ...]]] = [(LEGACY_CPUSET, ("cpus", "cpuset.cpus"))]
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        where, fstype, options = Path(fields[1]), fields[2], fields[3].split(",")
        if fstype == "cgroup" and "cpuset" in options:
            bases.append((where, ("cpuset.cpus",)))
        elif fstype == "cpuset":
            bases.append((where, ("cpus", "cpuset.cpus")))
    for base, names in dict.fromkeys(bases):
        files += [base / "torque" / job_id / name for name in names]
    return files


def job_cpuset(job_id: str, mounts: Path = Path("/proc/self/mounts")) -> frozenset[int] | None:
    """The OS CPUs of the job's pbs_mom cpuset; None if pbs_mom made none. A file that is
    not root's alone (:mod:`vmbatch.trust`) is ignored: pbs_mom runs as root."""
    for path in cpuset_files(job_id, mounts.read_text()):
        try:
            text = path.read_text()
        except OSError:
            continue
        if (why := trust.untrusted_reason(path)) is not None:
            log.warning("ignoring the cpuset %s: %s", path, why)
            continue
        try:
            return parse_cpu_list(text)
        except ValueError:
            log.warning("the cpuset %s holds no CPU list (%r)", path, text[:80])
    return None
