"""The scheduler-independent hooks: prologue (boot), job starter (run), epilogue (tear down).

One job, one VM:

1. The **prologue** (root) turns the scheduler's request into a :class:`JobSpec` (image from
   ``#VMBATCH image=`` or ``[batch].default_image``; cores and memory as granted, within
   the node), boots the VM with :func:`vmbatch.lifecycle.start_vm` (or restores it from
   the job's newest valid checkpoint, :mod:`vmbatch.checkpoint`) and leaves it running.
   Its record (:mod:`vmbatch.hooks.jobstate`) is written before anything is made and after
   each step. The job's user gets a 0700 directory with the per-job SSH key and the
   guest's port and pinned host key. If the prologue fails for any reason but the node's,
   the directory holds the message and the exit status instead, as the failure policy
   (:mod:`vmbatch.hooks.policy`) decided: the starter prints the one into the job's stderr
   and exits with the other (fail, requeue or hold the job; the node stays in service).
2. The **job starter** (the job's user) logs in with that key, runs the job script with the
   job's environment (:class:`~vmbatch.guest.session.Session`: output streamed, signals
   forwarded, reconnects) and exits with the job's status.
3. The **epilogue** (root) destroys the domain, removes disks, keys, the user's directory
   and the record, and appends one JSON accounting line. It works from the record, or from
   the job id alone if there is none (prologue never ran, or died early): idempotent.

Dispositions of failures become exit codes through :mod:`vmbatch.hooks.exitcodes`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pwd
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from vmbatch import accel, checkpoint, faults, lifecycle, limits, logsetup, metrics, signals, state
from vmbatch.config import Config
from vmbatch.contextualize.keys import KeyPair
from vmbatch.errors import (
    CheckpointRefusedError,
    GuestError,
    GuestLostError,
    HostError,
    ImageError,
    JobBusyError,
    JobError,
    LibvirtTimeoutError,
    LibvirtUnavailableError,
    MountError,
    VmBatchError,
)
from vmbatch.guest import ssh
from vmbatch.guest.session import ENV_DENY, GuestJob, Session, job_environment
from vmbatch.hooks import accounting, policy
from vmbatch.hooks.accounting import JobEnd
from vmbatch.hooks.jobstate import FAILED, KEPT, READY, PauseNote, Record, StateStore, UserDir
from vmbatch.hooks.policy import ImageHealth
from vmbatch.hooks.request import Resources, choose_image, directives, size_vm
from vmbatch.images.cache import ImageCache
from vmbatch.images.catalog import resolve
from vmbatch.images.disks import DiskBudget
from vmbatch.job import JobSpec, JobUser
from vmbatch.libvirt import health
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import domain_name
from vmbatch.limits import cpu_list
from vmbatch.retry import LIBVIRT_TEARDOWN_POLICY

log = logging.getLogger(__name__)

#: Scheduler job ids: Slurm's are numbers, Torque's ``123.server`` or ``123[4].server``.
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\[\]-]{0,99}")
#: What :func:`finish` does with the job's checkpoints.
Checkpoints = Literal["job_end", "keep", "drop"]


@dataclass(frozen=True, slots=True)
class BatchJob:
    """One job as a scheduler's prologue describes it."""

    scheduler: str
    job_id: str
    user: str
    resources: Resources
    name: str = ""
    #: The job script, for ``#VMBATCH`` directives (None: not available).
    script: bytes | None = None
    #: The job's working directory on the node, if the scheduler tells the prologue (Slurm's
    #: ``SLURM_JOB_WORK_DIR``; the OCI bundle lacks it) - handed to the starter.
    workdir: str | None = None
    #: How often the scheduler ran the job before (Slurm's ``SLURM_JOB_RESTART_COUNT``).
    restarts: int = 0
    #: Asks the scheduler which host CPUs (OS numbers) the job has on this node; None
    #: (or a None answer): it does not say. Called by the prologue, inside its error
    #: handling: a JobError from it fails the job, never the node.
    find_cpus: Callable[[], frozenset[int] | None] | None = None


def check_job_id(job_id: str) -> str:
    if not JOB_ID.fullmatch(job_id):
        raise JobError(
            f"job id {job_id[:120]!r} has characters vmbatch does not accept",
            hint="job ids are letters, digits and . _ - [ ]; check the hook's arguments",
        )
    return job_id


def host_memory_mib() -> int:
    """MemTotal of /proc/meminfo in MiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise HostError("/proc/meminfo has no MemTotal")


def job_spec(cfg: Config, bj: BatchJob, identity: JobUser) -> JobSpec:
    """The VM a job gets: its image choice, size and host CPUs, checked against the site's
    rules. Its memory hard limit is the job's memory grant where the scheduler made one
    (the guest gets the grant less QEMU's overhead, :mod:`vmbatch.limits`)."""
    wanted = directives(bj.script) if bj.script is not None else {}
    if wanted.get("vm", "yes") != "yes":
        # Slurm's job_submit.lua decides this before a job is queued; this node only sees
        # a job it must run in a VM (Torque runs every job in one).
        raise JobError(
            f"the job script says '#VMBATCH vm={wanted['vm']}', but this job runs in a VM",
            hint="remove the line, or submit where the site lets jobs run without a VM",
        )
    image = choose_image(wanted.get("image"), cfg.batch.default_image, cfg.batch.user_images)
    entry = cfg.images[image]
    domain_type = accel.choose(cfg).domain_type
    size = size_vm(
        bj.resources,
        default_vcpus=entry.vcpus or cfg.vm.vcpus,
        default_memory=entry.memory or cfg.vm.memory,
        host_cpus=os.cpu_count() or 1,
        host_memory=host_memory_mib(),
        reserve_memory=cfg.batch.reserve_memory,
        max_vcpus=cfg.batch.max_vcpus,
        max_memory=cfg.batch.max_memory,
        overhead=lambda guest: limits.qemu_overhead_mib(cfg, guest, domain_type),
    )
    cpus = bj.find_cpus() if cfg.limits.pin_cpus and bj.find_cpus is not None else None
    return JobSpec(
        job_id=bj.job_id,
        user=bj.user,
        image=image,
        argv=(),
        scheduler=bj.scheduler,
        memory=size.memory,
        vcpus=size.vcpus,
        identity=identity,
        walltime=bj.resources.walltime,
        cpus=cpus or frozenset(),
        memory_limit=size.host_memory if cfg.limits.memory_limit else None,
    )


def prologue(
    cfg: Config,
    bj: BatchJob,
    *,
    conn: Connection | None = None,
    timings: MutableMapping[str, float] | None = None,
) -> VmBatchError | None:
    """Boot the job's VM and leave it running; return the error that stopped it, if any.

    Never raises a :class:`VmBatchError`: the caller maps the returned error's disposition
    to the scheduler's exit code (and drains/offlines the node for node problems).

    libvirtd's health (:mod:`vmbatch.libvirt.health`): first it is restarted if its memory
    passed ``[libvirt].max_rss_mib``; if the attempt then fails because libvirtd is dead or
    does not answer, it is restarted (within the budget) and, once it answers, the job
    gets one more attempt on a fresh connection, which first cleans up the failed one.
    """
    with logsetup.job(bj.job_id):  # its lines name the job, whoever calls
        return _prologue(cfg, bj, conn, timings)


def _prologue(
    cfg: Config,
    bj: BatchJob,
    conn: Connection | None,
    timings: MutableMapping[str, float] | None,
) -> VmBatchError | None:
    health.maybe_restart_for_rss(cfg)
    error = _prologue_attempt(cfg, bj, conn, timings)
    if not isinstance(error, LibvirtUnavailableError | LibvirtTimeoutError):
        return error
    outcome = health.recovery(cfg, str(error))
    if not outcome.healthy:
        return type(error)(
            f"{error.message}; {outcome.detail}",
            hint="see libvirtd's log, restart it by hand, then bring the node back",
        )
    log.warning("%s; preparing the job's VM once more", outcome.detail)
    return _prologue_attempt(cfg, bj, None, timings)


def _prologue_attempt(
    cfg: Config,
    bj: BatchJob,
    conn: Connection | None,
    timings: MutableMapping[str, float] | None,
) -> VmBatchError | None:
    store = StateStore(cfg.batch.state_dir)
    try:
        check_job_id(bj.job_id)
        with signals.interruptible(), store.exclusive(bj.job_id):
            leftover = store.read(bj.job_id)
            if leftover is not None:
                log.warning(
                    "state of an earlier prologue (%s, boot %s) found; cleaning up first",
                    leftover.phase,
                    leftover.boot_id[:8],
                )
                _finish_locked(cfg, store, bj.job_id, leftover, conn, None, account=False)
            return _prologue_locked(cfg, bj, store, conn, timings)
    except JobBusyError:
        # The first prologue owns the job's files: this one changes nothing, not even them.
        return JobError(
            f"another vmbatch prologue for job {bj.job_id} is running; this one did nothing",
            hint="the scheduler started the prologue twice for one job id",
        )
    except VmBatchError as exc:
        return exc


def _prologue_locked(
    cfg: Config,
    bj: BatchJob,
    store: StateStore,
    conn: Connection | None,
    timings: MutableMapping[str, float] | None,
) -> VmBatchError | None:
    faults.point(cfg, "prologue.locked")
    userdir = UserDir(cfg.batch.user_dir, bj.job_id)
    record = Record(
        job_id=bj.job_id,
        scheduler=bj.scheduler,
        user=bj.user,
        domain=domain_name(bj.job_id),
        jobdir=str(state.JobDir(cfg.paths.job_dir, bj.job_id).path),
        boot_id=state.boot_id(),
        prologue_pid=os.getpid(),
        started=time.time(),
        restarts=bj.restarts if bj.scheduler == "slurm" else None,
    )
    store.write(record)
    faults.point(cfg, "prologue.recorded")
    identity: JobUser | None = None
    health = ImageHealth(cfg)
    try:
        identity = JobUser.from_host(bj.user)
        record = store.write(dataclasses.replace(record, uid=identity.uid, gid=identity.gid))
        spec = job_spec(cfg, bj, identity)
        record = store.write(
            dataclasses.replace(
                record,
                image=spec.image,
                cpus=cpu_list(spec.cpus) if spec.cpus else None,
                memory_limit_mib=spec.memory_limit,
                keep=keep_request(cfg, bj),
            )
        )
        faults.point(cfg, "prologue.sized")
        log.info(
            "image %s, %d cores (%s), %d MiB (%s)",
            spec.image,
            spec.vcpus,
            f"pinned to host CPUs {record.cpus}" if record.cpus else "not pinned",
            spec.memory,
            f"hard limit {spec.memory_limit} MiB with QEMU"
            if spec.memory_limit
            else "no memory limit",
        )
        health.check(spec.image)
        kept_record = record

        def keep(exc: BaseException) -> str | None:
            if not isinstance(exc, GuestError | ImageError | MountError):
                return None  # a cancel, a host or node fault: nothing to inspect in the VM
            mode = keep_mode(cfg, kept_record, JobEnd(exit_status=1))
            return mode if mode is not None and _keep_room(cfg, store, bj.job_id) else None

        guest = _restored(cfg, spec, conn, record.restarts) or lifecycle.start_vm(
            cfg, spec, conn, timer=lifecycle.PhaseTimer(timings), keep=keep
        )
        faults.point(cfg, "prologue.vm_started")
    except lifecycle.KeptError as kept:
        exc = kept.error
        if not isinstance(exc, VmBatchError):  # keep() accepts only those
            raise exc from None
        until = time.time() + cfg.batch.keep_failed_for
        store.write(
            dataclasses.replace(
                record,
                phase=KEPT,
                kept_as=kept.mode,
                kept_until=round(until, 3),
                error=str(exc),
                cause=_cause(exc),
            )
        )
        log.warning(
            "its VM failed (%s) and is kept %s for inspection until %s"
            " ([batch].keep_failed); `vmbatch cleanup %s` removes it now",
            exc.message.splitlines()[0],
            kept.mode,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until)),
            bj.job_id,
        )
        if policy.counts_against_image(exc):
            health.failed(record.image, exc)
        if identity is not None:
            _tell_starter(cfg, bj, userdir, identity, exc)
        return exc
    except VmBatchError as exc:
        store.write(dataclasses.replace(record, phase=FAILED, error=str(exc), cause=_cause(exc)))
        if record.image and policy.counts_against_image(exc):
            health.failed(record.image, exc)
        if identity is not None:
            _tell_starter(cfg, bj, userdir, identity, exc)
        return exc
    health.succeeded(spec.image)
    try:
        record = store.write(
            dataclasses.replace(
                record,
                image_path=str(guest.image_path) if guest.image_path else None,
                boot_seconds=round(time.time() - record.started, 3),
            )
        )
        faults.point(cfg, "prologue.boot_recorded")
        info = {
            "job_id": bj.job_id,
            "image": spec.image,
            "host": guest.endpoint.host,
            "port": guest.endpoint.port,
            "user": identity.name,
            "host_key": guest.endpoint.host_key.public_openssh,
            "workdir": bj.workdir,
            "memory_limit_mib": spec.memory_limit,
            "restored": guest.restored,
        }
        userdir.create(
            identity.uid,
            identity.gid,
            {
                UserDir.KEY: guest.endpoint.client_key.private_openssh.encode(),
                UserDir.GUEST: (json.dumps(info, sort_keys=True) + "\n").encode(),
            },
        )
        faults.point(cfg, "prologue.userdir_written")
        store.write(dataclasses.replace(record, phase=READY))
        faults.point(cfg, "prologue.ready")
    except BaseException as exc:
        with signals.deferred():
            guest.close()
            lifecycle.teardown(cfg, guest.conn, guest.name, guest.jobdir)
            guest.release_image()
            if isinstance(exc, VmBatchError):
                store.write(
                    dataclasses.replace(record, phase=FAILED, error=str(exc), cause=_cause(exc))
                )
        raise
    finally:
        guest.close()
        if conn is None:
            guest.conn.close()
    log.info("VM %s ready after %.1fs", guest.name, record.boot_seconds or 0)
    return None


def _restored(
    cfg: Config, spec: JobSpec, conn: Connection | None, restarts: int | None = None
) -> lifecycle.Guest | None:
    """The job's VM restored from its newest valid checkpoint (:mod:`vmbatch.checkpoint`),
    or None: there is none, and the job boots afresh. A checkpoint that does not verify or
    restore is logged with its reason; then the job boots afresh (``[checkpoint].on_bad =
    "fresh"``) or CheckpointRefusedError holds it (``"hold"``: the checkpoints are kept).
    The restored VM gets this run's allocation (``spec``: its CPUs, its memory limit), and
    one larger than ``spec`` is refused (:func:`vmbatch.checkpoint.fits`).

    Only checkpoints of an earlier run of this very job are looked at (:func:`_stale`;
    ``restarts``: Slurm's ``SLURM_JOB_RESTART_COUNT`` of this run); others are removed."""
    job_id = spec.job_id
    if not checkpoint.job_base(cfg, job_id).is_dir():
        return None
    stale = _stale(cfg, job_id, restarts)
    if stale is not None:
        log.warning(
            "checkpoints in %s not restored and removed: %s",
            checkpoint.job_base(cfg, job_id),
            stale,
        )
        checkpoint.discard(cfg, job_id)
        return None
    found = checkpoint.newest_valid(cfg, job_id)
    for refusal in found.refused:
        log.warning("checkpoint %s not used: %s", refusal.path.name, refusal.reason)
    problems = [
        f"checkpoint {r.path.name}: {r.reason}" for r in found.refused if r.path.name.isdigit()
    ]
    cp = found.checkpoint
    if cp is not None:
        name = domain_name(job_id)
        image = resolve(cfg, spec.image, allow_path=spec.allow_image_path, job_id=job_id)
        release = image.cached
        wanted = str(cp.manifest.get("base_image", {}).get("path", ""))
        own = conn is None
        live = conn if conn is not None else Connection(cfg.libvirt).open()
        try:
            owner = (cp.manifest.get("user"), cp.manifest.get("uid"))
            mine = (spec.user, spec.identity.uid if spec.identity else None)
            if owner != mine:
                raise CheckpointRefusedError(
                    f"it was taken for user {owner[0]} (uid {owner[1]}), and this job is"
                    f" {mine[0]}'s (uid {mine[1]}): a job id that came back for another user"
                )
            if wanted and str(image.path) != wanted:
                raise CheckpointRefusedError(
                    f"its overlay is on {wanted}, but image {spec.image} is now {image.path}"
                )
            endpoint, client = checkpoint.restore(cfg, cp, live, name=name, spec=spec)
        except (LibvirtUnavailableError, LibvirtTimeoutError):
            # The node's fault, not the checkpoint's: the job is requeued (the node's
            # failure policy) and its checkpoints stay for the next run.
            if release:
                ImageCache(cfg).release(image.path, job_id)
            if own:
                live.close()
            raise
        except VmBatchError as exc:
            problems.append(f"checkpoint {cp.generation}: {exc}")
            if release:
                ImageCache(cfg).release(image.path, job_id)
            if own:
                live.close()
        else:
            checkpoint.clear_requeue(cfg, job_id)
            return lifecycle.Guest(
                cfg,
                spec,
                name,
                endpoint,
                client,
                lambda: live.is_running(name),
                conn=live,
                jobdir=state.JobDir(cfg.paths.job_dir, job_id),
                image=image.name,
                image_path=image.path if release else None,
                restored=cp.generation,
            )
    if not problems:
        checkpoint.clear_requeue(cfg, job_id)
        return None
    why = "; ".join(problems)
    if cfg.checkpoint.on_bad == "hold":
        checkpoint.mark_requeue(cfg, job_id)  # kept through the epilogue for the admin
        raise CheckpointRefusedError(
            f"job {job_id} was not restored from its checkpoint: {why}",
            hint=f"the checkpoints stay in {checkpoint.job_base(cfg, job_id)}; remove them"
            " (`vmbatch cleanup`) or fix the cause, then release the job",
        )
    log.warning("job %s starts afresh, not from its checkpoint: %s", job_id, why)
    checkpoint.clear_requeue(cfg, job_id)
    return None


def _stale(cfg: Config, job_id: str, restarts: int | None) -> str | None:
    """Why the job's checkpoint directory is not for this run to restore (None: it is).

    It is if the job's previous run said it runs again (the ``requeue`` mark: a
    ``--stop``, a requeue its Epilog saw, a held restore, the reaper after a node failure),
    or, on Slurm, if the checkpoint was taken in an earlier run of this job: this run's
    restart count is above the one in its newest manifest (a node failure whose node did
    not come back to say so). Anything else is a leftover under a job id that came back
    (a scheduler's ids restart): never handed to the new job, even the same user's."""
    if checkpoint.requeued(cfg, job_id):
        return None
    taken = checkpoint.taken_in(checkpoint.job_base(cfg, job_id))
    if restarts is not None and taken is not None and restarts > taken:
        return None
    if restarts is None:
        return "the job's previous run did not say it runs again (no requeue mark)"
    return (
        f"the job's previous run did not say it runs again (no requeue mark), and this run"
        f" (restart count {restarts}) is not later than the checkpoint's"
        f" ({'unknown' if taken is None else taken}): a job id that came back"
    )


def keep_request(cfg: Config, bj: BatchJob) -> str:
    """The job's ``#VMBATCH keep=yes|no`` ("" if none), where ``[batch].user_keep`` lets
    jobs ask; elsewhere the request is logged and ignored."""
    value = directives(bj.script).get("keep") if bj.script is not None else None
    if value is None:
        return ""
    if value not in ("yes", "no"):
        raise JobError(
            f"the job script says '#VMBATCH keep={value}'",
            hint="write keep=yes (keep the VM if the job fails) or keep=no",
        )
    if not cfg.batch.user_keep:
        log.warning(
            "job %s asks '#VMBATCH keep=%s'; ignored: this site does not let jobs choose"
            " ([batch].user_keep)",
            bj.job_id,
            value,
        )
        return ""
    return value


def may_keep(cfg: Config, record: Record) -> bool:
    """Whether a failed job's VM could be kept at all (:func:`keep_mode` for some status)."""
    return record.keep != "no" and (cfg.batch.keep_failed != "no" or record.keep == "yes")


def keep_mode(cfg: Config, record: Record, end: JobEnd) -> str | None:
    """How a finished job's VM is kept ("paused", "disks"), or None: torn down. Only a job
    whose script failed is kept: the scheduler reports a non-zero exit status and no
    signal. A signal means the scheduler (or its admin) ended the job: a cancel or its time
    limit (Slurm ``ExitCode=0:15``, Torque 256+N); a job the scheduler never started
    (Torque's session id 0) or ended before its VM was ready (Slurm's EndTime) was
    cancelled during boot. None of these is kept. Kept as ``[batch].keep_failed`` says;
    one that asked ``keep=yes`` also where that is "no" (paused); never one that asked
    ``keep=no``."""
    if end.exit_status in (None, 0) or end.exit_signal or record.keep == "no":
        return None
    if end.job_started is False:
        return None
    ready = accounting.ready_time(record)
    if end.end_time is not None and ready is not None and end.end_time <= ready:
        return None
    mode = cfg.batch.keep_failed
    if mode == "no":
        return "paused" if record.keep == "yes" else None
    return mode


def _tell_starter(
    cfg: Config, bj: BatchJob, userdir: UserDir, identity: JobUser, exc: VmBatchError
) -> None:
    """Leave the failure policy's message and exit status for the job starter, which prints
    the one into the job's output and exits with the other (:mod:`vmbatch.hooks.policy`).
    Node faults leave nothing: the scheduler hears of them from the prologue itself."""
    decision = policy.decide(
        cfg, exc, scheduler=bj.scheduler, restarts=bj.restarts, node=socket.gethostname()
    )
    if isinstance(exc, CheckpointRefusedError) and cfg.batch.hold_exit:
        # [checkpoint].on_bad = "hold": the job waits for an admin, its checkpoints kept.
        decision = policy.Decision(
            policy.Outcome.HOLD,
            f"{exc}; the job is held: release it with `scontrol release JOBID` once the cause"
            " is fixed",
            cfg.batch.hold_exit,
        )
    if decision.outcome is policy.Outcome.NODE:
        return
    log.error("%s fault: %s", exc.fault.value, decision.outcome.value)
    userdir.create(
        identity.uid,
        identity.gid,
        {UserDir.ERROR: decision.message.encode(), UserDir.STATUS: b"%d\n" % decision.status},
    )


def _cause(exc: VmBatchError) -> str:
    return f"{type(exc).__name__}: {exc.message}"


def _vm_may_remain(cfg: Config, record: Record, name: str) -> bool:
    """Whether a failed prologue's teardown may not have reached libvirtd (dead or hung)
    while its VM runs: then clean up through libvirt (a restarted libvirtd takes the VM
    over). A VM is a QEMU process: if none on this host is named ``name`` (one of this
    configuration's, :func:`vmbatch.reaper.find_qemus`), nothing of it runs, whether
    libvirtd answers or not (a prologue that never reached libvirtd made none)."""
    from vmbatch.reaper import find_qemus  # the reaper imports this module

    kind = (record.cause or "").partition(":")[0]
    if kind not in (LibvirtUnavailableError.__name__, LibvirtTimeoutError.__name__):
        return False
    return any(q.name == name for q in find_qemus(cfg.paths.job_dir, cfg.tools.qemu_system))


# -- the job starter ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StarterJob:
    """What the starter runs: the script, its arguments, environment and working dir."""

    job_id: str
    script: bytes
    args: tuple[str, ...]
    environment: Mapping[str, str]
    workdir: str | None
    #: A Slurm job step (``srun``): its number or ``interactive``; None: the job's script.
    step: str | None = None
    scheduler: str = ""
    #: The descriptor holding the job's stdin (Slurm: the task's stdin: the ``--input``
    #: file, srun's pipe, or ``--pty``'s terminal); None: empty (Torque: the starter's stdin
    #: is pbs_mom's pipe with the script's path).
    stdin: int | None = None


class StarterError(VmBatchError):
    """The job's VM is missing or was not made; the message goes to the job's stderr."""


class NoVmPreparedError(StarterError):
    """No prologue prepared a VM for the job on this node (it did not run, or failed
    before it wrote anything): a transient fault of this run."""


class PrologueFailedError(JobError):
    """The prologue failed for this job and left its message and the starter's exit status
    (the failure policy's decision: fail, requeue or hold the job)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class CheckpointStoppedError(PrologueFailedError):
    """The job's VM was checkpointed and stopped for a requeue: the starter exits with
    ``[batch].requeue_exit`` (Slurm's ``RequeueExit`` requeues the job)."""


def _status(text: bytes | None) -> int:
    """The starter's exit status the prologue chose (65 if none or unreadable)."""
    value = (text or b"").strip()
    return int(value) if value.isdigit() and 0 < int(value) < 256 else 65


def guest_workdir(cfg: Config, cwd: str | None) -> str | None:
    """The job's working directory if the guest has it (under a ``[mounts]`` path), else
    None: the user's home in the guest."""
    if cwd is None:
        return None
    for mount in cfg.mounts.values():
        if Path(cwd) == mount.path or mount.path in Path(cwd).parents:
            return cwd
    return None


def _port_open(host: str, port: int) -> bool:
    """QEMU's user-mode forward listens while the VM's QEMU runs (starter cannot ask libvirt)."""
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def _current(endpoint: ssh.Endpoint, userdir: UserDir) -> ssh.Endpoint:
    """``endpoint`` on the VM's SSH port now: a checkpoint that ran the VM on restored it
    with a new forward, whose port root puts in the pause note (the user cannot change)."""
    port = userdir.read_note().port
    return endpoint if port in (None, endpoint.port) else dataclasses.replace(endpoint, port=port)


def _vm_alive(endpoint: ssh.Endpoint, userdir: UserDir) -> bool:
    """Whether the job's VM is still there: its forwarded port is open, or root holds it
    paused (a pause or a checkpoint under way: its port may be closed meanwhile); not once
    a checkpoint stopped it."""
    note: PauseNote = userdir.read_note()
    if note.stopped:
        return False
    if note.paused:
        return True
    return _port_open(endpoint.host, note.port or endpoint.port)


def _endpoint(cfg: Config, info: Mapping[str, Any], key: bytes) -> ssh.Endpoint:
    """The guest's login for the job's user, from the user directory's ``guest.json``."""
    logsetup.secret(key.decode(errors="replace"))
    return ssh.Endpoint(
        port=int(info["port"]),
        user=str(info["user"]),
        client_key=KeyPair(key.decode(), ""),
        host_key=KeyPair("", str(info["host_key"])),
        host=str(info["host"]),
        connect_timeout=cfg.ssh.connect_timeout,
        keepalive_interval=cfg.ssh.keepalive_interval,
    )


def starter(cfg: Config, job: StarterJob, out: BinaryIO, err: BinaryIO) -> int:
    """Run ``job`` in its VM as the calling user; return its exit status."""
    userdir = UserDir(cfg.batch.user_dir, job.job_id)
    message = userdir.read(UserDir.ERROR)
    if message is not None:
        raise PrologueFailedError(
            message.decode(errors="replace").strip(), status=_status(userdir.read(UserDir.STATUS))
        )
    info = userdir.guest()
    key = userdir.read(UserDir.KEY)
    if info is None or key is None:
        raise NoVmPreparedError(
            f"no VM was prepared for job {job.job_id} on this node ({userdir.path} is"
            " missing or incomplete)",
            hint="the vmbatch prologue did not run or failed: see the node's log",
        )
    name = pwd.getpwuid(os.getuid()).pw_name
    if info.get("user") != name:
        raise StarterError(f"the VM of job {job.job_id} was prepared for another user")
    endpoint = _endpoint(cfg, info, key)
    workdir = job.workdir or (info.get("workdir") if isinstance(info.get("workdir"), str) else None)
    gjob = GuestJob(
        job_id=job.job_id,
        script=job.script,
        args=job.args,
        environment=job_environment(job.environment, ENV_DENY | frozenset(cfg.job.env_deny)),
        workdir=guest_workdir(cfg, workdir),
        kill_grace=cfg.job.kill_grace,
        step=job.step,
        srun=job.scheduler == "slurm",
        image=str(info.get("image") or ""),
    )
    session = Session(
        connect=lambda: ssh.connect(_current(endpoint, userdir)),
        is_alive=lambda: _vm_alive(endpoint, userdir),
        job=gjob,
        reconnect_timeout=cfg.ssh.reconnect_timeout,
        liveness_interval=cfg.ssh.liveness_interval,
        liveness_timeout=cfg.ssh.connect_timeout,
        watch=DiskBudget(cfg, state.JobDir(cfg.paths.job_dir, job.job_id)),
        stdin=job.stdin,
        paused=userdir.read_paused,
        on_signal=lambda signum: _on_signal(cfg, job.job_id, session, signum),
    )
    started = False

    def mark_started() -> None:
        nonlocal started
        started = True
        accounting.mark_started(userdir, time.time())

    try:
        with signals.job_control():
            return _run_session(cfg, session, out, err, mark_started, bool(info.get("restored")))
    except GuestLostError as exc:
        if userdir.read_note().stopped:
            raise CheckpointStoppedError(
                f"the VM of job {job.job_id} was checkpointed and stopped (`vmbatch checkpoint"
                " --stop`); the job's next run continues it from the checkpoint",
                status=cfg.batch.requeue_exit,
            ) from exc
        limit = info.get("memory_limit_mib")
        if isinstance(limit, int):
            exc.hint = (f"{exc.hint}; " if exc.hint else "") + (
                f"the host's kernel stops a VM whose QEMU passes its memory limit of {limit}"
                " MiB (the job's memory, QEMU's own share included)"
            )
        if not started:
            accounting.mark_not_started(userdir, _cause(exc))
        raise
    except VmBatchError as exc:
        if not started:
            accounting.mark_not_started(userdir, _cause(exc))
        raise
    finally:
        if session.client is not None:
            session.client.close()


def _on_signal(cfg: Config, job_id: str, session: Session, signum: int) -> bool:
    """SIGUSR2 with ``[checkpoint].usr2 = "checkpoint"``: ask the node agent for a
    checkpoint of the job's VM (it runs on), in the background, and forward the signal to
    the job once the checkpoint is written (or refused), so that the job's trap runs after
    it. True: the signal is taken here."""
    if signum != signal.SIGUSR2 or cfg.checkpoint.usr2 != "checkpoint":
        return False

    def ask() -> None:
        from vmbatch import agent

        try:
            taken, message = agent.ask_checkpoint(cfg, job_id)
            if taken:
                log.warning("SIGUSR2: %s; the job runs on", message)
            else:
                log.warning("SIGUSR2: no checkpoint: %s", message)
        finally:
            session.forward_later(signum)

    threading.Thread(target=ask, name="checkpoint request", daemon=True).start()
    return True


def _run_session(
    cfg: Config,
    session: Session,
    out: BinaryIO,
    err: BinaryIO,
    mark_started: Callable[[], None],
    restored: bool,
) -> int:
    if session.interactive:  # srun --pty
        with signals.interruptible():
            return session.attach(out, on_start=mark_started)
    with signals.interruptible():
        # Restored from a checkpoint: the job runs in the guest already (its files in the
        # saved disks and memory); follow it from its first byte instead.
        if not (restored and session.has_started()):
            session.start()
    mark_started()
    faults.point(cfg, "starter.job_started")
    return session.follow(out, err)


def precancel(cfg: Config, job_id: str) -> None:
    """End the job in its guest before the scheduler kills the starter (Torque's
    ``epilogue.precancel``, as the job's user): SIGTERM to the job's process group.

    pbs_mom waits for this hook before it signals the job, so ``qdel`` waits too: every
    attempt logs in afresh while QEMU's forwarded port is open, a command that hangs is cut
    off after ``[ssh].connect_timeout``, and attempts stop after
    ``[batch].precancel_timeout``. Raises if the job could not be signalled (the caller
    logs it and exits 0: the starter still forwards pbs_mom's own SIGTERM).
    """
    userdir = UserDir(cfg.batch.user_dir, job_id)
    info, key = userdir.guest(), userdir.read(UserDir.KEY)
    if info is None or key is None:
        return
    endpoint = _endpoint(cfg, info, key)
    session = Session(
        connect=lambda: ssh.connect(endpoint),
        is_alive=lambda: _port_open(endpoint.host, endpoint.port),
        job=GuestJob(job_id, b""),
        reconnect_timeout=cfg.batch.precancel_timeout,
        exec_timeout=cfg.ssh.connect_timeout,
    )
    try:
        session.send_signal(signal.SIGTERM)
    finally:
        if session.client is not None:
            session.client.close()


# -- the epilogue ---------------------------------------------------------------------


def finish(
    cfg: Config,
    job_id: str,
    record: Record | None = None,
    *,
    conn: Connection | None = None,
    end: JobEnd | Callable[[], JobEnd] | None = None,
    account: bool = False,
    lock_wait: float = 1.0,
    if_unchanged: bool = False,
    checkpoints: Checkpoints = "job_end",
) -> bool:
    """Tear down everything of ``job_id``; with ``account``, append its accounting line.

    ``end`` is how the scheduler says the job ended, or a function that asks it: called
    after the VM is gone (a slow scheduler never keeps a VM alive), under the lock.

    Works from ``record`` (or the stored one) and falls back to what the job id implies,
    holding the job's lock (JobBusyError if another hook keeps it past ``lock_wait``).
    Raises HostError if the VM could not be destroyed; the record is then kept so that
    ``vmbatch cleanup`` can finish later.

    With ``if_unchanged`` nothing is done (False is returned) unless the stored record, once
    the lock is held, is still ``record`` (None: still no record): the reaper decided on
    what it read before, and a new prologue of the same job id may have replaced it since.

    The job's checkpoints (:mod:`vmbatch.checkpoint`) go last, as ``checkpoints`` says:

    - ``"job_end"`` (the epilogue): removed, unless the job's next run restores one: its
      VM was stopped for a checkpoint (the ``requeue`` mark), or on Slurm the job runs
      again as ``end`` tells (:func:`_requeued`: a higher restart count, a requeue exit
      status, or nothing known); then they are kept and marked;
    - ``"keep"`` (the reaper, for Slurm jobs: it cannot tell a requeue from an end): kept
      and marked; the reaper removes marked checkpoints once Slurm says the job ended
      (:func:`vmbatch.reaper.reap`);
    - ``"drop"`` (an admin's ``vmbatch cleanup JOB``): removed in any case.
    """
    store = StateStore(cfg.batch.state_dir)
    if callable(end):
        end = functools.cache(end)  # asked once, whoever asks first
    with logsetup.job(job_id), store.exclusive(job_id, wait=lock_wait):
        if if_unchanged and store.read(job_id) != record:
            return False
        record = record or store.read(job_id)
        _finish_locked(cfg, store, job_id, record, conn, end, account=account)
        if checkpoints == "drop":
            checkpoint.clear_requeue(cfg, job_id)
        elif checkpoints == "keep":
            if checkpoint.job_base(cfg, job_id).is_dir():
                checkpoint.mark_requeue(cfg, job_id)  # for the reaper's own pass
            return True
        elif _requeued(cfg, job_id, record, end):
            checkpoint.mark_requeue(cfg, job_id)
        checkpoint.discard(cfg, job_id)
    return True


def _requeued(
    cfg: Config, job_id: str, record: Record | None, end: JobEnd | Callable[[], JobEnd] | None
) -> bool:
    """Whether the job runs again (only asked if it has checkpoints), as Slurm 22.05 says it
    to the Epilog (src/slurmctld/job_mgr.c):

    - ``scontrol requeue``, preemption with ``PreemptMode=REQUEUE``, a failed launch:
      ``_job_requeue_op`` counts the run before the job's nodes are told to end it, so the
      Epilog's ``SLURM_JOB_RESTART_COUNT`` (from the kill message's credential) and
      ``squeue``'s ``RestartCnt`` are one above the Prolog's;
    - ``RequeueExit``/``RequeueExitHold``: counted only after every Epilog ended
      (``job_hold_requeue`` from ``cleanup_completing``), so the starter's exit status
      tells: ``[batch].requeue_exit`` or ``hold_exit`` (a held job runs again once
      released);
    - nothing known (slurmctld unreachable, no count in the environment): kept, and left to
      the reaper, which removes them once Slurm says the job ended (a checkpoint lost is
      the job's work lost; one kept too long is disk, for a while).
    """
    if record is None or record.restarts is None or end is None:
        return False
    if not checkpoint.job_base(cfg, job_id).is_dir():
        return False
    told = _job_end(job_id, end)
    vmbatch_requeue = {cfg.batch.requeue_exit, cfg.batch.hold_exit} - {0}
    if told.restarts is not None and told.restarts > record.restarts:
        why = f"the scheduler requeued it (run {told.restarts + 1}, was {record.restarts + 1})"
    elif told.exit_status in vmbatch_requeue:
        why = f"its run ended with exit status {told.exit_status}, for a requeue"
    elif told.restarts is None:
        why = "the scheduler did not say whether it requeued it; the reaper decides later"
    else:
        return False
    log.info("job %s runs again: %s; its checkpoints stay for its next run", job_id, why)
    return True


def _finish_locked(
    cfg: Config,
    store: StateStore,
    job_id: str,
    record: Record | None,
    conn: Connection | None,
    end: JobEnd | Callable[[], JobEnd] | None,
    *,
    account: bool,
) -> None:
    """:func:`finish` under the job's lock. The VM goes first: nothing the job's user can
    put in their directory (a FUSE mount, a full disk) may keep it alive; the user's
    directory is removed after, and whatever stays of it is a logged warning, not a leak."""
    record = record or store.read(job_id)
    name = record.domain if record and record.domain else domain_name(job_id)
    jobdir = state.JobDir(cfg.paths.job_dir, job_id)
    own = conn is None
    ended = time.time()
    usage = _qemu_usage(cfg, name) if account else None
    userdir = UserDir(cfg.batch.user_dir, job_id)
    marker: accounting.Marker | None = None
    if account and record is not None and record.phase == KEPT:
        # Kept when its prologue failed (not accounted yet), or a second epilogue.
        if not record.accounted:
            write_accounting(
                cfg,
                job_id,
                record,
                _job_end(job_id, end),
                usage,
                marker=accounting.read_marker(userdir),
                ended=ended,
            )
            store.write(dataclasses.replace(record, accounted=True))
        log.info("its VM stays kept for inspection (`vmbatch ps`)")
        return
    if (
        account
        and record is not None
        and record.phase == READY
        and not record.migrated_to  # kept VMs are this node's (`vmbatch ps`, reaper)
        and may_keep(cfg, record)
    ):
        # Only here is the scheduler asked before the teardown: whether the VM is kept
        # depends on the job's exit status.
        end = _job_end(job_id, end)
        mode = keep_mode(cfg, record, end)
        if mode is not None and _keep(cfg, store, record, conn, mode, end, usage, ended):
            return
    try:
        if (
            record is not None
            and record.phase == FAILED
            and conn is None
            and not _vm_may_remain(cfg, record, name)
        ):
            # The prologue's own teardown ran when it failed; only files may be left (a
            # caller with a connection, the reaper, also makes sure no VM is left).
            lifecycle.teardown(cfg, None, name, jobdir)
        else:
            given = conn
            conn, names = _job_domains(cfg, conn, job_id, name)
            own = conn is not given
            for each in sorted(names):
                lifecycle.teardown(cfg, conn, each, jobdir)
        if record is not None and record.migrated_to:
            _teardown_migrated(cfg, record, name)
    except HostError as exc:
        raise HostError(
            f"job {job_id}: could not make sure its VM {name} is gone: {exc.message}",
            hint="run `vmbatch cleanup` once libvirtd answers again",
        ) from exc
    finally:
        if own and conn is not None:
            conn.close()
        if account:
            marker = accounting.read_marker(userdir)
        userdir.remove()  # warns if the user blocks it
    faults.point(cfg, "finish.userdir_removed")
    if account and not (record is not None and record.accounted):
        write_accounting(
            cfg, job_id, record, _job_end(job_id, end), usage, marker=marker, ended=ended
        )
        if record is not None:  # an epilogue killed from here on writes no second line
            store.write(dataclasses.replace(record, accounted=True))
        faults.point(cfg, "finish.accounted")
    # Also a marker a prologue killed before it could record the image (SIGKILL).
    ImageCache(cfg).release_job(job_id)
    faults.point(cfg, "finish.image_released")
    store.remove(job_id)
    faults.point(cfg, "finish.record_removed")


def _teardown_migrated(cfg: Config, record: Record, name: str) -> None:
    """The job's VM was migrated (``vmbatch migrate``): destroy it at the destination's
    libvirtd and remove its files there (the destination directory is on this host's file
    system, as :func:`vmbatch.migrate.migrate` requires). Its relay stops when the record
    goes (``vmbatch agent``)."""
    there = Path(record.migrated_dir) if record.migrated_dir else None
    jobdir = None
    if there is not None and there.is_absolute() and there.name == state.safe_job_id(record.job_id):
        jobdir = state.JobDir(there.parent, record.job_id)
    with Connection(dataclasses.replace(cfg.libvirt, uri=record.migrated_to)) as conn:
        lifecycle.teardown(cfg, conn, name, jobdir)
    log.info("its VM %s at %s is gone", name, record.migrated_to)


def _job_end(job_id: str, end: JobEnd | Callable[[], JobEnd] | None) -> JobEnd:
    if end is None or isinstance(end, JobEnd):
        return end or JobEnd()
    try:
        return end()
    except Exception as exc:  # noqa: BLE001 - the line is written with what is known
        log.warning("the scheduler's exit status is not known (%s)", exc)
        return JobEnd()


def _keep(
    cfg: Config,
    store: StateStore,
    record: Record,
    conn: Connection | None,
    mode: str,
    end: JobEnd,
    usage: limits.QemuUsage | None,
    ended: float,
) -> bool:
    """Keep the failed job's VM paused, or its disks, until ``[batch].keep_failed_for``
    from now; write its accounting line and record it as ``kept``. False (logged): not
    kept (no room under ``keep_failed_max``, no VM left, libvirt refused): the caller
    tears it down as usual."""
    job_id = record.job_id
    if not _keep_room(cfg, store, job_id):
        return False
    own = conn is None
    try:
        if conn is None:
            conn = Connection(cfg.libvirt).open()
        if mode == "paused":
            conn.suspend(record.domain)
        else:
            lifecycle.teardown(cfg, conn, record.domain, None)
    except VmBatchError as exc:
        log.warning("could not keep its VM %s: %s", record.domain, exc)
        return False
    finally:
        if own and conn is not None:
            conn.close()
    userdir = UserDir(cfg.batch.user_dir, job_id)
    marker = accounting.read_marker(userdir)
    if mode == "disks":
        userdir.remove()  # nothing left to log in to
    until = time.time() + cfg.batch.keep_failed_for
    write_accounting(cfg, job_id, record, end, usage, marker=marker, ended=ended)
    store.write(
        dataclasses.replace(
            record, phase=KEPT, kept_as=mode, kept_until=round(until, 3), accounted=True
        )
    )
    log.warning(
        "failed (exit status %s): its VM %s is kept %s for inspection until %s"
        " ([batch].keep_failed); `vmbatch cleanup %s` removes it now",
        end.exit_status,
        record.domain,
        "paused" if mode == "paused" else "as disks only (destroyed)",
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until)),
        job_id,
    )
    return True


def _keep_room(cfg: Config, store: StateStore, job_id: str) -> bool:
    """Whether another job may be kept here (``[batch].keep_failed_max``; logged if not)."""
    others = [r for r in store.records() if r.phase == KEPT and r.job_id != job_id]
    if len(others) < cfg.batch.keep_failed_max:
        return True
    log.warning(
        "job %s failed; its VM is not kept: %d job(s) kept on this node already"
        " ([batch].keep_failed_max)",
        job_id,
        len(others),
    )
    return False


def _job_domains(
    cfg: Config, conn: Connection | None, job_id: str, name: str
) -> tuple[Connection, set[str]]:
    """A connection and the job's domains (its name, and any with its job id in the
    metadata). While libvirtd is dead or hangs, again on fresh connections until
    ``[libvirt].teardown_timeout``, as the destroy itself does: found by bench/soak.py, an
    Epilog gave up after one ``[libvirt].timeout`` while libvirtd was stopped for a few
    seconds more, and its job's VM ran on after libvirtd resumed. A connection the caller
    passed in is tried first and never closed here; the one returned is the caller's to
    close if it is not the caller's own."""

    def domains(c: Connection) -> set[str]:
        listed = c.list_vmbatch()
        return {name} | {d.name for d in listed if d.metadata and d.metadata.job_id == job_id}

    if conn is not None:
        try:
            return conn, domains(conn)
        except (LibvirtUnavailableError, LibvirtTimeoutError) as exc:
            log.warning("could not list the VMs of job %s (%s); trying anew", job_id, exc)
    for attempt in LIBVIRT_TEARDOWN_POLICY.retrying(max_delay=cfg.libvirt.teardown_timeout):
        with attempt:
            fresh = Connection(cfg.libvirt).open()
            try:
                return fresh, domains(fresh)
            except BaseException:
                fresh.close()
                raise
    raise AssertionError("unreachable: the retry policy re-raises")  # pragma: no cover


def _qemu_usage(cfg: Config, name: str) -> limits.QemuUsage | None:
    """The usage of the job's QEMU so far, read before it is destroyed (None: none runs).
    The scheduler does not see it: QEMU is libvirtd's child, in libvirt's cgroup, not in
    the job's (docs/admin-slurm.md, docs/admin-torque.md "Accounting")."""
    from vmbatch.reaper import find_qemus  # the reaper imports this module

    for qemu in find_qemus(cfg.paths.job_dir, cfg.tools.qemu_system):
        if qemu.name == name:
            return limits.qemu_usage(qemu.pid)
    return None


def write_accounting(
    cfg: Config,
    job_id: str,
    record: Record | None,
    end: JobEnd | None = None,
    usage: limits.QemuUsage | None = None,
    *,
    marker: accounting.Marker | None = None,
    ended: float | None = None,
) -> dict[str, Any]:
    """Append the job's JSON line to ``[batch].accounting_log`` (best effort) and return it
    (:mod:`vmbatch.hooks.accounting` says what each field means and where it comes from).
    ``ended``: when the epilogue began (the end of the script's run time; default now)."""
    entry = accounting.line(
        job_id,
        record,
        end or JobEnd(),
        marker,
        usage,
        ended=time.time() if ended is None else ended,
    )
    accounting.append(cfg.batch.accounting_log, entry)
    metrics.job_finished(cfg, entry)
    return entry
