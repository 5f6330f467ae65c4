"""Console scripts of the batch hooks: ``vmbatch-prologue``, ``-epilogue``, ``-starter``.

Each tells Slurm from Torque by how it was called (Slurm: ``SLURM_JOB_ID`` in the
environment, or ``vmbatch-starter slurm JOBID`` from oci.conf; Torque: argv), parses the
scheduler's view of the job, calls :mod:`vmbatch.hooks.batch` and turns the outcome into
the scheduler's exit code through :mod:`vmbatch.hooks.exitcodes` - the one place per script
where a VmBatchError becomes a message and an exit status. Log lines go where ``[log]``
says (:mod:`vmbatch.logsetup`: the journal, syslog or stderr), each naming the job; root's
lines of a job also go to its ``vmbatch.log`` while its directory exists. With a journal or
syslog target the hooks' stderr (Slurm: the slurmd log; Torque: the job's .e file) gets
only the one-line ``vmbatch: error: ...`` a person acts on.

Root trusts nothing a job's user controls (docs/design.md, "Hostile input"). The
configuration is ``--config PATH`` (the hook's first two arguments, for a site's wrapper),
else ``$VMBATCH_CONFIG`` where the environment is the scheduler daemon's own (Slurm's
Prolog/Epilog, pbs_mom's prologue/epilogue), else ``/etc/vmbatch/vmbatch.toml``; run as
root, every file of it and every directory root writes in must be root's alone
(:mod:`vmbatch.trust`). The privileged Torque starter's environment is the job's: it
ignores ``VMBATCH_CONFIG`` and ``PBS_JOBID`` and takes the job id from the script path on
pbs_mom's stdin pipe, and the user to become from the root-only state record, checked
against the password database.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pwd
import shlex
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from vmbatch import config, limits, logsetup, metrics, state, trust
from vmbatch.errors import Disposition, Fault, JobError, JobInterruptedError, VmBatchError
from vmbatch.guest.session import command_script
from vmbatch.hooks import batch, policy, slurm, taskprolog, torque
from vmbatch.hooks.accounting import JobEnd, torque_end
from vmbatch.hooks.batch import NoVmPreparedError, PrologueFailedError, StarterError
from vmbatch.hooks.exitcodes import (
    CLI,
    CLI_INTERNAL_ERROR,
    SLURM_EPILOG_FAILED,
    SLURM_PROLOG,
    TORQUE_PROLOGUE,
    TORQUE_PROLOGUE_ABORT,
)
from vmbatch.hooks.jobstate import KEPT, StateStore, UserDir
from vmbatch.hooks.request import Resources, torque_prologue
from vmbatch.job import JobUser

log = logging.getLogger("vmbatch")


def _logging(script: str, job_id: str, level: int = logging.INFO) -> None:
    """Until the configuration is read: stderr, as the scheduler keeps it. Lines name the
    job only if its id is one (it is checked, and refused, later)."""
    logsetup.early(script, job_id if batch.JOB_ID.fullmatch(job_id) else None, level)


def _root_logging(cfg: config.Config, script: str) -> None:
    """Root's hooks: the ``[log]`` target, and each job's ``vmbatch.log``; stderr only
    gets the lines of ``target = "stderr"`` (or of a target given up)."""
    logsetup.configure(cfg.log, script, stderr_level=None, job_dir=cfg.paths.job_dir)


def _is_slurm(env: Mapping[str, str]) -> bool:
    return bool(env.get("SLURM_JOB_ID"))


def _split_config(argv: Sequence[str]) -> tuple[Path | None, list[str]]:
    """``HOOK --config PATH ARGS...`` -> (PATH, [HOOK, ARGS...]); no option -> (None, argv)."""
    if len(argv) >= 3 and argv[1] == "--config":
        return Path(argv[2]), [argv[0], *argv[3:]]
    return None, list(argv)


def _load(path: Path | None, *, honour_env: bool = True) -> config.Config:
    """The configuration; as root, only files and directories that root alone controls."""
    return config.load(path, honour_env=honour_env, as_root=os.geteuid() == 0)


# -- prologue -------------------------------------------------------------------------


def run_prologue(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """The prologue for either scheduler; returns its exit status."""
    path, argv = _split_config(argv)
    is_slurm = _is_slurm(env)
    table = SLURM_PROLOG if is_slurm else TORQUE_PROLOGUE
    job_id = env.get("SLURM_JOB_ID", "") if is_slurm else (argv[1] if len(argv) > 1 else "")
    _logging("vmbatch-prologue", job_id)
    started = time.monotonic()
    # pbs_mom runs the prologue with umask 0077; libvirt reads the overlay's header as
    # QEMU's user before it relabels the disks, so the job's files need the usual 022.
    os.umask(0o022)
    try:
        cfg = _load(path)
    except VmBatchError as exc:
        log.error("%s", exc)
        return _node_problem(None, is_slurm, env, exc, table, argv)
    _root_logging(cfg, "vmbatch-prologue")
    try:
        if is_slurm and not _slurm_in_scope(cfg, env):
            return 0
    except VmBatchError as exc:
        log.error("%s", exc)
        return _node_problem(cfg, is_slurm, env, exc, table, argv)
    _reap_quickly(cfg)
    metrics.job_started(cfg)
    try:
        bj = _slurm_job(cfg, env) if is_slurm else _torque_job(argv)
    except VmBatchError as exc:
        log.error("%s", exc)
        return _node_problem(cfg, is_slurm, env, exc, table, argv)
    error = batch.prologue(cfg, bj)
    seconds = time.monotonic() - started
    if error is None:
        logsetup.stage(log, "prologue", seconds, "the VM is ready")
        return 0
    logsetup.stage(log, "prologue", seconds, f"failed: {error.fault.value} fault")
    if error.fault is not Fault.NODE:
        # The failure policy: the job starter fails, requeues or holds the job with the
        # message in its output; only node faults take the node out of service.
        log.error("%s (the node stays in service)", error)
        return table[Disposition.ABORT_JOB]
    log.error("%s", error)
    return _node_problem(cfg, is_slurm, env, error, table, argv)


def _slurm_in_scope(cfg: config.Config, env: Mapping[str, str]) -> bool:
    """Is this Slurm job one of vmbatch's? ``job_submit.lua`` decided (the site's scope,
    ``conf/slurm/vmbatch.lua``) and marked it with ``[slurm].bundle`` as its container;
    the Prolog reads the mark from slurmctld (``squeue``, as root), never from the job's
    environment. Other jobs run on the node as if vmbatch were not there: the hook
    returns at once, with no VM, no state and no reaper pass."""
    jid = batch.check_job_id(slurm.job_id(env))
    if slurm.is_vmbatch_job(cfg, jid, env):
        return True
    log.info("not in vmbatch's scope (its container is not %s)", cfg.slurm.bundle)
    return False


def _reap_quickly(cfg: config.Config) -> None:
    """The reaper's cheap pass before each prologue (:func:`vmbatch.reaper.reap`): what a
    reboot, a killed `vmbatch run`, a lost QEMU or a killed injection left, and dead
    downloads. It never asks the scheduler (each job older than the grace would cost a
    query: that is the timer's job) and never fails the prologue. Only a count is logged:
    Torque puts the prologue's stderr into the job's .e file, and the report names other
    users' jobs."""
    from vmbatch import reaper  # imports hooks.batch

    try:
        report = reaper.reap(
            cfg,
            scheduler_check=lambda _s, _j: reaper.Verdict(True, "left to the timer"),
            checkpoints=False,
        )
    except Exception as exc:  # noqa: BLE001 - housekeeping must not fail the job
        log.warning("the reaper's pass before the prologue failed: %s", exc)
        return
    if report.removed:
        log.info(
            "reaper: removed %d leftover(s) of jobs that no longer run on this node",
            len(report.removed),
        )


def _node_problem(
    cfg: config.Config | None,
    is_slurm: bool,
    env: Mapping[str, str],
    error: VmBatchError,
    table: Mapping[Disposition, int],
    argv: Sequence[str] = (),
) -> int:
    """Say why in the scheduler's node state (Slurm drain reason, Torque offline note).

    Torque: if ``pbsnodes -o`` fails (no operator rights for root@node, a node name that
    differs from the hostname, no pbsnodes), a requeue would bring the job straight back to
    this node in a tight loop. Instead the job runs and fails once: the prologue leaves the
    node problem in the user's directory, exits 0, and the job starter prints it into the
    job's .e file (exit 65). Exit 1 would also stop the loop, but without the .e file.
    """
    if not logsetup.errors_on_stderr():
        sys.stderr.write(logsetup.redact(f"vmbatch: error: {error}\n"))
    disposition = error.disposition
    reason = f"vmbatch: {error.message}"
    if cfg is None:  # the configuration itself is broken: use the defaults' tool paths
        cfg = config.Config()
    # Both for REQUEUE and OFFLINE_NODE: Slurm drains the node for any non-zero Prolog
    # anyway, and Torque redispatches a requeued job at once, to the same node, in a tight
    # loop, unless the node is out of service (docs/platform.md).
    if is_slurm and env.get("SLURMD_NODENAME"):
        _drain(cfg, env["SLURMD_NODENAME"], reason, env)
    elif not is_slurm:
        hook = state.process_identity(os.getpid()) or ""
        note = policy.take_out(
            cfg,
            lambda: torque.offline_note(reason) if torque.offline(cfg, reason) else None,
            lambda note: policy.NodeMark(
                "torque", socket.gethostname(), note, time.time(), hook=hook
            ),
        )
        if note is None:
            return _fail_job_here(cfg, argv, error)
    if disposition is Disposition.ABORT_JOB:  # malformed hook call: not the job's fault
        disposition = Disposition.OFFLINE_NODE
    return table[disposition]


def _drain(cfg: config.Config, node: str, reason: str, env: Mapping[str, str]) -> None:
    """Drain the node, and remember it so that vmbatch resumes it once the cause cleared."""
    hook = state.process_identity(os.getpid()) or ""
    policy.take_out(
        cfg,
        lambda: slurm.drain(cfg, node, reason, env),
        lambda clean: policy.NodeMark(
            "slurm", node, clean, time.time(), env.get("SLURM_CONF", ""), hook=hook
        ),
    )


def _fail_job_here(cfg: config.Config, argv: Sequence[str], error: VmBatchError) -> int:
    """Torque with the node still online: fail this job once with the node's problem."""
    job_id, user = (argv[1], argv[2]) if len(argv) > 2 else ("", "")
    message = (
        f"this node ({socket.gethostname()}) cannot run VMs right now: {error}; vmbatch"
        " could not take the node offline, so the job was failed instead of requeued to it"
    )
    try:
        batch.check_job_id(job_id)
        who = JobUser.from_host(user)
        UserDir(cfg.batch.user_dir, job_id).create(
            who.uid, who.gid, {UserDir.ERROR: message.encode()}
        )
    except VmBatchError as exc:
        log.error("could not leave the message for job %s (%s): aborting it", job_id, exc)
        return TORQUE_PROLOGUE_ABORT
    log.error("%s", message)
    return TORQUE_PROLOGUE[Disposition.ABORT_JOB]


def _slurm_job(cfg: config.Config, env: Mapping[str, str]) -> batch.BatchJob:
    jid = batch.check_job_id(slurm.job_id(env))
    resources, name = slurm.job_details(cfg, jid, env)
    cpus = slurm.cpus_on_node(env.get("SLURM_JOB_CPUS_PER_NODE", ""))
    return batch.BatchJob(
        scheduler="slurm",
        job_id=jid,
        user=slurm.user(env),
        resources=Resources(cpus, resources.memory_mib, resources.walltime),
        name=name,
        script=slurm.batch_script(cfg, jid, env),
        workdir=env.get("SLURM_JOB_WORK_DIR") or None,
        restarts=policy.restart_count(env),
        find_cpus=lambda: _slurm_cpus(cfg, jid, env),
    )


def _slurm_cpus(cfg: config.Config, jid: str, env: Mapping[str, str]) -> frozenset[int] | None:
    """The job's CPUs on this node as OS numbers (``CPU_IDs`` of ``scontrol show job -d``,
    mapped as slurmd maps them); None, logged, where Slurm names none this host has."""
    node = env.get("SLURMD_NODENAME", "")
    ids = slurm.job_cpu_ids(cfg, jid, node, env) if node else None
    if ids is None:
        log.warning("Slurm names no CPUs of node %r for it; the VM is not pinned", node)
        return None
    cpus = limits.slurm_to_os(ids, limits.host_cpus())
    if cpus is None:
        log.warning(
            "Slurm's CPU_IDs=%s are not this host's CPUs (slurm.conf describes node %s"
            " otherwise than `slurmd -C`); the VM is not pinned",
            limits.cpu_list(ids),
            node,
        )
    return cpus


def _torque_job(argv: Sequence[str]) -> batch.BatchJob:
    tj = torque_prologue(argv)
    script: bytes | None = None
    if tj.script:
        try:
            script = Path(tj.script).read_bytes()
        except OSError as exc:
            log.warning("cannot read the job script %s (%s): no directives", tj.script, exc)
    return batch.BatchJob(
        "torque",
        tj.job_id,
        tj.user,
        tj.resources,
        tj.name,
        script,
        find_cpus=lambda: _torque_cpus(tj.job_id),
    )


def _torque_cpus(job_id: str) -> frozenset[int] | None:
    """The job's pbs_mom cpuset; None, logged, if pbs_mom made none."""
    cpus = torque.job_cpuset(batch.check_job_id(job_id))
    if cpus is None:
        log.info("pbs_mom made no cpuset for it; the VM is not pinned")
    return cpus


def prologue() -> None:
    sys.exit(_guarded(lambda: run_prologue(sys.argv, os.environ), 2))


# -- job starter ----------------------------------------------------------------------


def run_starter(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """The job starter for either scheduler; returns the job's exit status."""
    path, argv = _split_config(argv)
    if len(argv) >= 3 and argv[1] == "slurm-query":  # oci.conf RunTimeQuery (root)
        print(slurm.oci_state(argv[2], argv[3] if len(argv) > 3 else ""))
        return 0
    if len(argv) >= 2 and argv[1] == "slurm-taskprolog":  # slurm.conf TaskProlog (user)
        return taskprolog.run(path, env)
    is_slurm = len(argv) >= 3 and argv[1] == "slurm"
    privileged = os.geteuid() == 0
    # The job's stderr: only what matters to the job's user (warnings and errors).
    _logging("vmbatch-starter", argv[2] if is_slurm else "", logging.WARNING)
    try:
        # As root (Torque's run_privileged) the environment is the job's: qsub -v sets it.
        cfg = _load(path, honour_env=not privileged)
        # The starter runs as the job's user (or becomes it): no vmbatch.log of root's.
        logsetup.configure(cfg.log, "vmbatch-starter", stderr_level=logging.WARNING)
        if is_slurm:
            job = _slurm_starter(argv)
        elif os.isatty(0):  # qsub -I: the user's terminal, no script path on stdin
            job = _torque_interactive(argv, env, privileged)
        else:
            job = _torque_starter(cfg, env, privileged)
        logsetup.set_job(job.job_id)
        try:
            started = time.monotonic()
            status = batch.starter(cfg, job, sys.stdout.buffer, sys.stderr.buffer)
            logsetup.stage(
                log, "job" if job.step is None else f"step {job.step}",
                time.monotonic() - started, f"exit status {status}",
            )  # fmt: skip
        except NoVmPreparedError as exc:
            if is_slurm and (outside := _outside_scope(cfg, job.job_id, env)):
                raise JobError(outside) from exc
            if not is_slurm or job.step is not None:
                raise
            return _no_vm_for_batch_step(cfg, job, exc)
        return reserved_status(cfg, status) if is_slurm else status
    except JobInterruptedError as exc:
        sys.stderr.write(f"vmbatch: {exc} before the job started\n")
        return 128 + exc.signum
    except PrologueFailedError as exc:
        sys.stderr.write(f"vmbatch: error: {exc}\n")
        return exc.status
    except VmBatchError as exc:
        sys.stderr.write(f"vmbatch: error: {exc}\n")
        return CLI[exc.disposition]


def _outside_scope(cfg: config.Config, job_id: str, env: Mapping[str, str]) -> str | None:
    """Why a container step with no VM is not vmbatch's to run, or None: the job's
    container (slurmctld's, asked as the job's user) is not ``[slurm].bundle``, so no VM
    will come for it: an ``srun --container`` in a job outside vmbatch's scope, or a
    container of the user's own (this node's oci.conf runs every container through
    vmbatch). That fails the step with the reason, rather than requeueing the job as if a
    Prolog had gone missing. None also when slurmctld cannot say (or no slurm.conf is
    found: squeue would then look for DNS SRV records)."""
    if not slurm.config_present(env):
        return None
    try:
        container = slurm.job_container(cfg, job_id, env)
    except VmBatchError:
        return None
    if container == str(cfg.slurm.bundle):
        return None
    if not container or container in ("N/A", "(null)"):
        return (
            f"job {job_id} runs without a vmbatch VM (it is outside the site's VM scope), so"
            " a step of it cannot name vmbatch's container; run the step without --container"
            " (docs/user-guide.md)"
        )
    return (
        f"job {job_id} names the container {container[:120]!r}; on this node containers run"
        " only as vmbatch VMs (oci.conf), and this job is not one of them"
    )


def _no_vm_for_batch_step(
    cfg: config.Config, job: batch.StarterJob, error: NoVmPreparedError
) -> int:
    """A Slurm batch step whose Prolog left nothing: Slurm 22.05 may start a requeued job's
    rerun without its Prolog (docs/design.md, "Soak"). That is this run's fault, not the
    job's: the failure policy requeues it (RequeueExit) and holds it at
    ``[batch].max_requeues`` (the restart count is ``SLURM_RESTART_COUNT`` of the job's
    environment), instead of failing a job that never ran."""
    decision = policy.decide(
        cfg,
        error,
        scheduler="slurm",
        restarts=policy.restart_count(job.environment),
        node=socket.gethostname(),
    )
    sys.stderr.write(f"vmbatch: error: {decision.message}\n")
    return decision.status


def reserved_status(cfg: config.Config, status: int) -> int:
    """A Slurm job's own exit status, unless slurm.conf reserves it for vmbatch's requeues
    (``[batch].requeue_exit``/``hold_exit`` in ``RequeueExit``/``RequeueExitHold``): passed
    through, such a job would be requeued again after every run, for ever (seen in the
    soak). It becomes 1, and the job's stderr says why."""
    if status not in {cfg.batch.requeue_exit, cfg.batch.hold_exit} - {0}:
        return status
    sys.stderr.write(
        f"vmbatch: the job exited with status {status}, which this site reserves for"
        " vmbatch's requeues (slurm.conf RequeueExit/RequeueExitHold); it is reported as 1"
        " so that Slurm does not requeue the job\n"
    )
    return 1


def _slurm_starter(argv: Sequence[str]) -> batch.StarterJob:
    """``vmbatch-starter slurm %j %b %s``: the job's script, or a step (``srun``), from
    the bundle copy in the cwd. A step's working directory is the ``PWD`` srun passed (22.05
    gives a container step none; :mod:`vmbatch.hooks.slurm`)."""
    job_id = batch.check_job_id(argv[2])
    bundle = Path.cwd()
    if not (bundle / "config.json").is_file() and len(argv) > 3:
        bundle = Path(argv[3])
    step = slurm.step_name(argv[4] if len(argv) > 4 else slurm.step_of_bundle(bundle))
    args, env, cwd = slurm.bundle_process(bundle)
    if step is None:
        first = Path(args[0])
        if first.is_file():  # the batch script, bind-mounted
            return batch.StarterJob(
                job_id, first.read_bytes(), args[1:], env, cwd, stdin=0, scheduler="slurm"
            )
        return batch.StarterJob(
            job_id, command_script(args), (), env, cwd, stdin=0, scheduler="slurm"
        )
    pwd_ = env.get("PWD", "")
    cwd = cwd or (pwd_ if pwd_.startswith("/") else None)
    script, rest = slurm.step_program(args, cwd)
    if script is None:
        script, rest = command_script(rest), ()
    return batch.StarterJob(job_id, script, rest, env, cwd, step=step, stdin=0, scheduler="slurm")


def _torque_starter(
    cfg: config.Config, env: Mapping[str, str], privileged: bool
) -> batch.StarterJob:
    """``$job_starter``: script path on stdin; as root (run_privileged) become the user.

    The job id is the script copy's name, ``mom_priv/jobs/<id>.SC``, from pbs_mom's
    root-owned pipe. ``PBS_JOBID`` is the job's environment (``qsub -v`` can set it): as
    root it must agree or the job is refused; as the user (no privilege to gain) it is
    used as before, the script's name filling in if it is missing.
    """
    path, args = torque.starter_command(sys.stdin.buffer)
    job_id = torque.job_id_of_script(path)
    if privileged:
        job_id = _privileged_job_id(path, job_id, env.get("PBS_JOBID"))
    else:
        job_id = env.get("PBS_JOBID") or job_id or ""
    job_id = batch.check_job_id(job_id)
    try:
        script = Path(path).read_bytes()
    except OSError as exc:
        raise JobError(
            f"cannot read the job script {path}: {exc.strerror}",
            hint="set $job_starter_run_privileged true in mom_priv/config",
        ) from exc
    if privileged:
        _become_job_user(cfg, job_id)
    return batch.StarterJob(job_id, script, args, dict(env), None)


def _torque_interactive(
    argv: Sequence[str], env: Mapping[str, str], privileged: bool
) -> batch.StarterJob:
    """``qsub -I``: pbs_mom runs ``$job_starter SHELL [-c COMMAND]`` (``qsub -x``) with the
    user's terminal as stdin instead of the script pipe (Torque 6.1 ``start_exec.c``:
    ``setup_interactive_command_if_present``, ``mom_jobstarter_execute_job``). The shell
    (or the command) runs on a terminal in the job's VM.

    The job id is ``PBS_JOBID``, from the job's environment: as the user that gains
    nothing (only the user's own VM directory is readable). As root there is no trusted
    source for it (no script file names the job), so the privileged starter refuses."""
    if privileged:
        raise JobError(
            "interactive jobs (qsub -I) cannot be started by a privileged job starter (no"
            " trusted job id); not started",
            hint="use nodes without $job_starter_run_privileged (docs/admin-torque.md)",
        )
    job_id = batch.check_job_id(env.get("PBS_JOBID", ""))
    shell = argv[1] if len(argv) > 1 and argv[1].startswith("/") else "/bin/sh"
    command = tuple(argv[2:4]) if len(argv) >= 4 and argv[2] == "-c" else ()
    return batch.StarterJob(
        job_id, interactive_shell_script(shell, command), (), dict(env), None, stdin=0
    )


def interactive_shell_script(shell: str, command: tuple[str, ...] = ()) -> bytes:
    """A job script that runs the user's shell in the VM (``/bin/sh`` if the image has
    none such, saying so), with ``-c COMMAND`` if given."""
    q = shlex.quote(shell)
    return (
        "#!/bin/sh\n"
        f"s={q}\n"
        'command -v -- "$s" >/dev/null 2>&1 || { printf \'vmbatch: your shell %s is not in'
        " the job'\\''s VM; starting /bin/sh\\n' \"$s\" >&2; s=/bin/sh; }\n"
        f'exec "$s" {shlex.join(command)}\n'
    ).encode()


def _privileged_job_id(path: str, job_id: str | None, claimed: str | None) -> str:
    reason = trust.untrusted_reason(Path(path).parent)
    if job_id is None or reason is not None:
        raise StarterError(
            f"the job script {path[:200]} on the starter's stdin is not a pbs_mom job file"
            f" ({reason or 'its name is not <job id>.SC'}); the job was not started",
            hint="vmbatch-starter must be pbs_mom's $job_starter (docs/admin-torque.md)",
        )
    if claimed and claimed != job_id:
        raise StarterError(
            f"PBS_JOBID {claimed[:120]!r} in the job's environment is not the job being"
            f" started ({job_id}); the job was not started",
            hint="do not set PBS_JOBID with qsub -v",
        )
    return job_id


def _become_job_user(cfg: config.Config, job_id: str) -> None:
    """Switch to the uid/gid the prologue recorded, once the password database agrees.

    The record lies in the root-only state directory and its user came from pbs_mom's
    prologue arguments; a record whose uid/gid are not that user's is refused, never used.
    """
    record = StateStore(cfg.batch.state_dir).read(job_id)
    if record is None:
        raise StarterError(f"no VM was prepared for job {job_id} (no prologue state)")
    try:
        pw = pwd.getpwnam(record.user)
    except KeyError:
        pw = None
    if pw is None or record.uid <= 0 or (pw.pw_uid, pw.pw_gid) != (record.uid, record.gid):
        raise StarterError(
            f"the state of job {job_id} names user {record.user[:40]!r} as uid/gid"
            f" {record.uid}/{record.gid}, which the node's password database does not"
            " confirm; the job was not started",
            hint="see the node's log; run `vmbatch cleanup` for the job",
        )
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    os.environ["HOME"] = pw.pw_dir
    os.chdir(pw.pw_dir)


def starter() -> None:
    sys.exit(_guarded(lambda: run_starter(sys.argv, os.environ), CLI_INTERNAL_ERROR))


# -- epilogue -------------------------------------------------------------------------


def run_epilogue(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """The epilogue (or Torque's ``epilogue.precancel`` with ``--precancel``)."""
    path, argv = _split_config(argv)
    if len(argv) > 1 and argv[1] == "--precancel":
        return _precancel(path, argv[1:])
    is_slurm = _is_slurm(env)
    job_id = env.get("SLURM_JOB_ID", "") if is_slurm else (argv[1] if len(argv) > 1 else "")
    _logging("vmbatch-epilogue", job_id)
    cfg: config.Config | None = None
    try:
        cfg = _load(path)
        _root_logging(cfg, "vmbatch-epilogue")
        end: JobEnd | Callable[[], JobEnd]
        if is_slurm:
            end = functools.partial(_slurm_job_end, cfg, job_id, env)  # after the teardown
        else:
            args = torque.epilogue_args(argv)
            job_id, end = args.job_id, torque_end(args.exit_status, args.session_id)
        batch.check_job_id(job_id)
        if is_slurm and not _slurm_epilog_needed(cfg, job_id, env):
            return 0
        # A prologue still booting (Torque: qdel meanwhile) keeps the lock up to its boot; a
        # checkpoint under way (the job ended meanwhile: its time limit after its
        # `--signal=B:USR2@T`) up to its save and its restore.
        started = time.monotonic()
        wait = max(cfg.vm.boot_timeout + 60, 2 * cfg.checkpoint.timeout + 120)
        batch.finish(cfg, job_id, end=end, account=True, lock_wait=wait)
        kept = StateStore(cfg.batch.state_dir).read(job_id)
        note = (
            "VM kept for inspection: see `vmbatch ps`"
            if kept is not None and kept.phase == KEPT
            else "VM and files removed"
        )
        logsetup.stage(log, "teardown", time.monotonic() - started, note)
    except VmBatchError as exc:
        log.error("%s", exc)
        if not logsetup.errors_on_stderr():
            sys.stderr.write(logsetup.redact(f"vmbatch: error: {exc}\n"))
        if is_slurm and env.get("SLURMD_NODENAME"):
            _drain(cfg or config.Config(), env["SLURMD_NODENAME"], f"vmbatch: {exc.message}", env)
        return SLURM_EPILOG_FAILED
    return 0


def _slurm_job_end(cfg: config.Config, job_id: str, env: Mapping[str, str]) -> JobEnd:
    """The job's end as slurmctld reports it (``scontrol show job``'s ``ExitCode``), else as
    the Epilog's environment has it (:mod:`vmbatch.hooks.accounting`, "Exit status"). Its
    restart count is the higher of the two (a requeue may land after the kill message)."""
    told = slurm.epilog_end(env)
    try:
        end = slurm.job_end(cfg, job_id, env)
    except VmBatchError as exc:
        log.warning(
            "slurmctld did not say how the job ended (%s); accounting the Epilog's"
            " SLURM_JOB_EXIT_CODE2",
            exc,
        )
        return told or JobEnd()
    if told is not None and (told.exit_status, told.exit_signal) != (
        end.exit_status,
        end.exit_signal,
    ):
        log.info(
            "slurmctld reports ExitCode=%s:%s; the Epilog's SLURM_JOB_EXIT_CODE2 was"
            " %s:%s (set when the job was ended, before its own status arrived)",
            end.exit_status,
            end.exit_signal,
            told.exit_status,
            told.exit_signal,
        )
    counts = [n for n in (end.restarts, told.restarts if told else None) if n is not None]
    return dataclasses.replace(end, restarts=max(counts)) if counts else end


def _slurm_epilog_needed(cfg: config.Config, job_id: str, env: Mapping[str, str]) -> bool:
    """Whether the Epilog has anything to do for this Slurm job: yes if the node holds a
    record of it, or if it is one of vmbatch's (:func:`_slurm_in_scope`), or if slurmctld
    cannot say (the full, idempotent teardown then runs, as for any job). A job out of
    vmbatch's scope left nothing here: no lock, no accounting line, exit 0 at once."""
    if StateStore(cfg.batch.state_dir).path(job_id).exists():
        return True
    try:
        mine = slurm.is_vmbatch_job(cfg, job_id, env)
    except VmBatchError as exc:
        log.warning("cannot tell whether it is vmbatch's (%s); cleaning up", exc)
        return True
    if not mine:
        log.info("not in vmbatch's scope: nothing to do")
    return mine


def _precancel(path: Path | None, argv: Sequence[str]) -> int:
    """As the job's user; never fails (Torque marks the node down if it does)."""
    job_id = argv[1] if len(argv) > 1 else ""
    _logging("vmbatch-precancel", job_id)
    try:
        cfg = _load(path)
        # As the job's user, stdio /dev/null: the [log] target only.
        logsetup.configure(cfg.log, "vmbatch-precancel", stderr_level=None)
        batch.precancel(cfg, batch.check_job_id(job_id))
    except Exception as exc:  # noqa: BLE001 - must exit 0 whatever happens
        log.warning("could not signal job %s in its VM: %s", job_id, exc)
    return 0


def epilogue() -> None:
    sys.exit(_guarded(lambda: run_epilogue(sys.argv, os.environ), SLURM_EPILOG_FAILED))


def _guarded(body: Callable[[], int], internal: int) -> int:
    """Run ``body``; an unexpected exception is logged and never looks like success."""
    try:
        return body()
    except Exception as exc:
        log.exception("internal error; please report it")
        # Also where the scheduler keeps it, whatever the [log] target.
        what = f"{type(exc).__name__}: {exc}"
        if not logsetup.errors_on_stderr():
            sys.stderr.write(logsetup.redact(f"vmbatch: internal error: {what}\n"))
        return internal
