"""The accounting line of a batch job: what the epilogue appends to ``[batch].accounting_log``.

One JSON object per line (format 2; docs/admin-guide.md "Accounting" lists every field):
how the scheduler says the job ended (``exit_status``/``exit_signal``, from where:
``exit_source``), whether the job's script ran at all (``script_ran``), why not or why the
prologue failed (``cause``), how long the boot and the script took, and what the VM used.

Where each fact comes from, and how far it is trusted:

- **Exit status.** Slurm: ``squeue -O exit_code`` asked by the Epilog, i.e. slurmctld's
  ``job_ptr->exit_code`` decoded as ``scontrol show job`` prints ``ExitCode=S:N``
  (``WEXITSTATUS`` and ``WTERMSIG``, src/api/job_info.c of 22.05). Not the Epilog's
  ``SLURM_JOB_EXIT_CODE2``: slurmd builds the Epilog's environment from the kill message
  (``create_kill_job_msg`` copies ``job_ptr->exit_code``, src/slurmctld/job_mgr.c;
  ``prep_script_slurmd.c`` exports it), and for ``scancel`` of a running job slurmctld sends
  that message at once (``job_signal`` -> ``deallocate_nodes``), while the exit code is still
  0; the batch step's own status arrives afterwards (``_job_complete`` of a finished job:
  ``if (job_ptr->exit_code == 0) job_ptr->exit_code = job_return_code``). That is how a
  cancelled job whose script trapped SIGTERM with ``exit 3`` showed ``ExitCode=3:0`` while the
  Epilog saw ``0:0``. slurmd runs the Epilog only after every step of the job has ended
  (``_pause_for_job_completion`` in src/slurmd/slurmd/req.c), and slurmstepd reports the batch
  step's status to slurmctld and waits for the reply before it ends (``batch_finish`` ->
  ``_send_complete_batch_script_msg`` in src/slurmd/slurmstepd/mgr.c), so the Epilog's query
  sees the final code. If slurmctld does not answer, the environment's value is used and
  ``exit_source`` says so. Torque: the epilogue's tenth argument, pbs_mom's ``ji_exitstat``
  (``run_pelog`` in src/resmom/prolog.c of Torque 6.1): the job's exit status, 256+N after
  death by signal N (``WTERMSIG(statloc) + 0x100``, src/resmom/linux/mom_start.c), negative
  ``JOB_EXEC_*`` codes for a job that did not start (src/include/pbs_job.h); recorded as given,
  with ``exit_signal`` N for 256+N.
- **Did the script run?** The job starter, as the job's user, leaves a marker in the job's
  user directory once the guest has started the script (``started``) or a line saying why it
  could not (``not-started``). The user could forge or remove it, so it is used for this
  line only and never for a decision root makes (docs/design.md, "Accounting"); root reads it
  without following links or blocking (:func:`read_marker`). Torque's session id 0 (the
  epilogue's fifth argument) means pbs_mom never started the job at all.
- **Cause** of a job whose script did not run: the prologue's error (class and message,
  from the root-only record), else the starter's line, else the scheduler's view: a Slurm job
  that slurmctld ended (``EndTime``) before its VM was ready was cancelled during boot
  (slurmd lets the Prolog finish, then runs the Epilog and never launches the batch step:
  ``_rpc_terminate_job`` waits in ``_wait_for_job_running_prolog``; ``_rpc_batch_job``:
  "Job %u already killed, do not launch batch job").
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbatch import limits
from vmbatch.hooks.jobstate import (
    FAILED,
    KEPT,
    PREPARING,
    READY,
    Record,
    UserDir,
    detach_mounts,
)

log = logging.getLogger(__name__)

#: Version of the line's layout: 2 has script_ran, exit_signal and exit_source; lines
#: without ``format`` are version 1 (exit_status shell style, 128+N after a signal).
FORMAT = 2
#: The user's markers are a timestamp or one line of text: read at most this much.
_MARKER_MAX = 4096
#: Causes of a job whose script never ran, as written in the line.
CANCELLED_DURING_BOOT = "cancelled during boot"
TIMELIMIT_DURING_BOOT = "time limit reached during boot"


@dataclass(frozen=True, slots=True)
class JobEnd:
    """How the scheduler says the job ended."""

    #: Exit status and signal as the scheduler reports them (Slurm: ``ExitCode=S:N``;
    #: Torque: ``exit_status`` as pbs_mom has it, N for 256+N). None: not known.
    exit_status: int | None = None
    exit_signal: int | None = None
    #: Where they came from: ``slurmctld``, ``epilog environment`` or ``pbs_mom``.
    source: str | None = None
    #: When the scheduler ended the job (Slurm's ``EndTime``, seconds), if it says.
    end_time: float | None = None
    #: Slurm's ``Reason`` for the job (``TimeLimit``, ...), if it says.
    reason: str | None = None
    #: Whether the scheduler started the job's starter at all (Torque: session id not 0);
    #: None: it does not say.
    job_started: bool | None = None
    #: How often the job ran before, as the scheduler counts now (Slurm's ``RestartCnt``,
    #: one more than the Prolog's ``SLURM_JOB_RESTART_COUNT`` if it was requeued); None:
    #: it does not say.
    restarts: int | None = None


def torque_end(exit_status: int | None, session_id: str | None) -> JobEnd:
    """pbs_mom's epilogue arguments: exit status (argv[10]) and session id (argv[5])."""
    signal = exit_status - 256 if exit_status is not None and exit_status > 256 else 0
    started = None if session_id is None or not session_id.isdigit() else session_id != "0"
    return JobEnd(
        exit_status,
        signal if exit_status is not None else None,
        "pbs_mom" if exit_status is not None else None,
        job_started=started,
    )


@dataclass(frozen=True, slots=True)
class Marker:
    """What the job starter left: when the script started, or why it did not."""

    started: float | None = None
    not_started: str | None = None


def mark_started(userdir: UserDir, when: float) -> None:
    """As the job's user: the guest started the script (the first start counts)."""
    _write_once(userdir.path / UserDir.STARTED, f"{when:.3f}\n".encode())


def mark_not_started(userdir: UserDir, why: str) -> None:
    """As the job's user: the starter could not start the script, and why."""
    _write_once(userdir.path / UserDir.NOT_STARTED, why.encode()[: _MARKER_MAX - 1] + b"\n")


def _write_once(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` unless it exists (best effort: logged, never raised:
    accounting must not fail the job)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        log.warning("could not leave the accounting marker %s: %s", path, exc.strerror)
        return
    try:
        os.write(fd, data)
    except OSError as exc:
        log.warning("could not write the accounting marker %s: %s", path, exc.strerror)
    finally:
        os.close(fd)


def read_marker(userdir: UserDir) -> Marker | None:
    """As root: the starter's marker, or None if it left none (or none that is readable).

    The directory is the user's: mounts in it are detached first (a FUSE server the user
    runs could block root's read for ever), and each file is opened without following a
    link and without blocking (a named pipe), read only if it is a regular file, at most
    :data:`_MARKER_MAX` bytes."""
    if not userdir.path.is_dir() or userdir.path.is_symlink():
        return None
    detach_mounts(userdir.path)
    started = _read_user_file(userdir.path / UserDir.STARTED)
    if started is not None:
        try:
            return Marker(started=float(started.strip() or b"nan"))
        except ValueError:
            return Marker(started=float("nan"))  # a start, at a time we cannot read
    why = _read_user_file(userdir.path / UserDir.NOT_STARTED)
    if why is not None:
        text = why.decode(errors="replace").strip()
        return Marker(not_started="".join(c if c.isprintable() else "?" for c in text)[:500])
    return None


def _read_user_file(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, _MARKER_MAX)
    except OSError:
        return None
    finally:
        os.close(fd)


def ready_time(record: Record | None) -> float | None:
    """When the job's VM was ready (the prologue's clock), if it was."""
    if record is None or record.boot_seconds is None:
        return None
    return record.started + record.boot_seconds


def why_not_run(record: Record | None, marker: Marker | None, end: JobEnd) -> str:
    """The cause of a job whose script did not run."""
    if record is None:
        if end.job_started is False:
            return "the scheduler did not start the job, and no prologue state exists"
        return "no prologue state (prologue did not run)"
    if record.phase == FAILED or (record.phase == KEPT and record.cause):
        # (KEPT with a cause: the prologue failed after making the VM, which was kept.)
        return record.cause or record.error or "the prologue failed"
    if record.phase == PREPARING:
        return "the prologue ended before the VM was ready (killed, or timed out)"
    if marker is not None and marker.not_started:
        return f"the job starter did not start the script: {marker.not_started}"
    ready = ready_time(record)
    if end.end_time is not None and ready is not None and end.end_time <= ready:
        return TIMELIMIT_DURING_BOOT if end.reason == "TimeLimit" else CANCELLED_DURING_BOOT
    if end.job_started is False:
        return f"the scheduler did not start the job (exit status {end.exit_status})"
    return "the job ended before its script started"


def line(
    job_id: str,
    record: Record | None,
    end: JobEnd,
    marker: Marker | None,
    usage: limits.QemuUsage | None,
    *,
    ended: float,
    now: float | None = None,
) -> dict[str, Any]:
    """The accounting line of ``job_id``; ``ended``: when its epilogue began, the end of its
    run time."""
    ready = ready_time(record) if record is not None and record.phase == READY else None
    ran = (
        ready is not None
        and marker is not None
        and marker.started is not None
        and end.job_started is not False
    )
    run = None
    if ran and ready is not None and marker is not None and marker.started is not None:
        # The start is the user's word: only a time between the VM's readiness and the
        # epilogue is taken (a forged or unreadable one counts from the readiness).
        start = marker.started if ready <= marker.started <= ended else ready
        run = round(max(0.0, ended - start), 3)
    return {
        "format": FORMAT,
        "time": round(time.time() if now is None else now, 3),
        "job_id": job_id,
        "scheduler": record.scheduler if record else None,
        "user": record.user if record else None,
        "image": (record.image or None) if record else None,
        "prologue_started": round(record.started, 3) if record and record.started else None,
        "boot_seconds": record.boot_seconds if record else None,
        "script_ran": ran,
        "run_seconds": run,
        "exit_status": end.exit_status,
        "exit_signal": end.exit_signal,
        "exit_source": end.source,
        "cause": None if ran else why_not_run(record, marker, end),
        "cpus": record.cpus if record else None,
        "memory_limit_mib": record.memory_limit_mib if record else None,
        "qemu_cpu_seconds": usage.cpu_seconds if usage else None,
        "qemu_peak_rss_mib": usage.peak_rss_mib if usage else None,
    }


def append(path: Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` as one line (0640, best effort: logged)."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
        try:
            os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        finally:
            os.close(fd)
    except OSError as exc:
        log.error("could not write the accounting record to %s: %s", path, exc)
