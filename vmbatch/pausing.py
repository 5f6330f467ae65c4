"""Why a job's VM is paused, and pausing or continuing it for one reason among several.

A running job's VM may be paused for several reasons at once: an operator's
``vmbatch suspend``, the scheduler's suspend (``scontrol suspend``, preemption with
``PreemptMode=SUSPEND``, Torque's ``qsig -s suspend``; seen by :mod:`vmbatch.agent`), a
checkpoint being written. Each adds its reason to :attr:`Record.pauses` and removes it
when done; the domain is paused (``virDomainSuspend``) when the first reason comes and
continued (``virDomainResume``) only when the last one goes, so an operator's pause
survives a scheduler's resume and the other way round.

Callers hold the job's lock (:meth:`StateStore.exclusive`). The record is written before
the domain is touched when a reason is added, and after it is continued when the last
one goes: a crash in between leaves a record that says "paused" for a VM that may run,
which the agent's next pass (or ``vmbatch resume``) corrects, never the reverse.

The job's starter (the user) cannot ask libvirt, so each change is also written to the
user directory's pause note (:attr:`UserDir.paused_note`): while it says paused, the
starter counts no time against its reconnect and liveness timeouts.

One reason pauses the job and not its VM: ``migration`` (``vmbatch migrate``, a live
migration: the VM runs on while its memory and disks are copied, and only the switch to
the destination is dark). It sets the starter's note, so that the connection the switch
drops is not taken for a lost guest, and never suspends or continues the domain.

The guest's clocks stop with its vCPUs, so after a pause its wall clock is behind; when
the VM runs again, its clock is set to the host's through the QEMU guest agent where the
image runs one (:meth:`Connection.set_guest_time`), else it stays behind (logged).
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import threading
import time

from vmbatch.config import Config
from vmbatch.errors import JobError
from vmbatch.hooks.jobstate import READY, Record, StateStore, UserDir
from vmbatch.libvirt.connection import Connection

log = logging.getLogger(__name__)

#: The reasons, in :attr:`Record.pauses`.
OPERATOR, SCHEDULER, CHECKPOINT = "operator", "scheduler", "checkpoint"
MIGRATION = "migration"
REASONS = (OPERATOR, SCHEDULER, CHECKPOINT, MIGRATION)
#: Reasons that pause the job's starter (its note) but not the domain.
NOTE_ONLY = frozenset({MIGRATION})


def vm_paused(pauses: tuple[str, ...]) -> bool:
    """Whether these reasons hold the domain itself paused."""
    return any(r not in NOTE_ONLY for r in pauses)


def connection(cfg: Config, record: Record) -> Connection:
    """A connection (not opened) to the libvirtd the job's VM runs at: this node's, or the
    one ``vmbatch migrate`` moved it to (:attr:`Record.migrated_to`)."""
    if record.migrated_to:
        return Connection(dataclasses.replace(cfg.libvirt, uri=record.migrated_to))
    return Connection(cfg.libvirt)


def ready_record(store: StateStore, job_id: str, what: str) -> Record:
    """The record of running batch job ``job_id``, for ``what`` (e.g. "paused or continued
    this way"); JobError if there is none or its prologue has not finished."""
    record = store.read(job_id)
    if record is None:
        raise JobError(
            f"no batch job {job_id} on this node (no state record)",
            hint="`vmbatch ps` lists the jobs here",
        )
    if record.phase != READY:
        raise JobError(
            f"job {job_id} is {record.phase}, not running: only a running job's VM is {what}",
            hint="`vmbatch ps` shows its phase",
        )
    return record


def tell_starter(
    cfg: Config,
    record: Record,
    paused: bool,
    *,
    new_pause: bool = False,
    port: int | None = None,
    stopped: bool = False,
) -> None:
    """Write root's pause note for the job's starter (``new_pause``: one more pause
    counted); a failure is logged: the job goes on, its starter may count the pause as
    silence (the agent rewrites a note that disagrees with its record)."""
    userdir = UserDir(cfg.batch.user_dir, record.job_id)
    count = userdir.read_note().pauses + (1 if new_pause else 0)
    try:
        userdir.write_paused(paused, count, port=port, stopped=stopped)
    except OSError as exc:
        log.warning("could not write the pause note %s: %s", userdir.paused_note, exc)


def add(cfg: Config, store: StateStore, conn: Connection, record: Record, reason: str) -> Record:
    """Pause the job's VM for ``reason`` (no-op for the domain if already paused for
    another); return the written record."""
    if reason in record.pauses:
        return record
    first = not record.pauses
    first_vm = reason not in NOTE_ONLY and not vm_paused(record.pauses)
    record = store.write(
        dataclasses.replace(
            record,
            pauses=(*record.pauses, reason),
            paused_at=time.time() if first_vm else record.paused_at,
        )
    )
    if first:
        tell_starter(cfg, record, True, new_pause=True)
    if first_vm:
        conn.suspend(record.domain)
        log.info("VM paused (%s)", reason)
    return record


def drop(
    cfg: Config,
    store: StateStore,
    conn: Connection,
    record: Record,
    reason: str,
    *,
    clock_in_background: bool = False,
) -> Record:
    """Remove ``reason``; continue the VM if no other reason is left. Return the record.
    ``clock_in_background``: set the guest's clock in a thread of its own (the agent: a
    guest agent that takes its time never holds up the other jobs)."""
    if reason not in record.pauses:
        return record
    left = tuple(r for r in record.pauses if r != reason)
    if reason in NOTE_ONLY or vm_paused(left):
        record = store.write(dataclasses.replace(record, pauses=left))
        if not left:
            tell_starter(cfg, record, False)
        elif vm_paused(left):
            log.info("%s pause over; VM stays paused (%s)", reason, ", ".join(left))
        return record
    conn.resume(record.domain)
    paused = time.time() - (record.paused_at or time.time())
    record = store.write(dataclasses.replace(record, pauses=left, paused_at=None))
    if not left:
        tell_starter(cfg, record, False)
    log.info("VM running again after %.1fs paused (%s pause over)", paused, reason)
    if clock_in_background:
        context = contextvars.copy_context()  # its lines name the job too
        threading.Thread(
            target=context.run, args=(_set_clock, conn, record.domain, paused), daemon=True
        ).start()
    else:
        _set_clock(conn, record.domain, paused)
    return record


def _set_clock(conn: Connection, domain: str, paused: float) -> None:
    why = conn.set_guest_time(domain)
    if why is None:
        log.info("guest clock set to the host's")
    else:
        log.info("guest clock not set, it is %.0fs behind: %s", paused, why)
