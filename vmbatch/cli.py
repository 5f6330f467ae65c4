"""The ``vmbatch`` command line. Errors are caught in exactly one place: :func:`main`."""

from __future__ import annotations

import json
import logging
import os
import pwd
import sys
import time
from pathlib import Path

import click

from vmbatch import __version__, config, doctor, lifecycle, logsetup
from vmbatch.contextualize import nocloud
from vmbatch.errors import (
    ConfigError,
    GuestConnectionError,
    HostError,
    ImageError,
    JobBusyError,
    JobError,
    JobInterruptedError,
    UnknownImageError,
    VmBatchError,
)
from vmbatch.hooks.exitcodes import CLI, CLI_INTERNAL_ERROR
from vmbatch.images import offer
from vmbatch.images.cache import ImageCache, is_cached_source
from vmbatch.job import JobUser, interactive

log = logging.getLogger("vmbatch")


def _verbosity(verbose: int) -> int:
    """The stderr level of ``-v`` counted ``verbose`` times: warnings, -v info, -vv debug."""
    return logging.WARNING - 10 * min(verbose, 2)


def _load(ctx: click.Context) -> config.Config:
    """The configuration; from now on log lines also go to its ``[log]`` target (at its
    level, or lower with -vv) and, as root, into each job's ``vmbatch.log``."""
    path: Path | None = ctx.obj["config"]
    root = os.geteuid() == 0
    # As root, only a configuration (and directories) that root alone controls.
    cfg = config.load(path, as_root=root)
    shown = _verbosity(ctx.obj.get("verbose", 0))
    logsetup.configure(
        cfg.log,
        "vmbatch",
        stderr_level=shown,
        job_dir=cfg.paths.job_dir if root else None,
        level=min(logsetup.LEVELS[cfg.log.level], shown),
    )
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vmbatch")
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="Configuration file (default: $VMBATCH_CONFIG or /etc/vmbatch/vmbatch.toml;"
    " drop-ins from the sibling <name>.d/ directory). As root, the files and the"
    " directories root writes in must be root-owned and not group/other-writable.",
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="More log output on stderr: -v info (each stage and its duration), -vv debug (every"
    " external command). The [log] target gets [log].level and above, debug too with -vv.",
)
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, verbose: int) -> None:
    """Run batch jobs in throw-away virtual machines.

    On a worker node with vmbatch's hooks, every Slurm or Torque job runs in its own fresh VM,
    destroyed when the job ends. These commands are the operator's and the user's view of
    that: what runs, what it logs and measures, and the node's health. `vmbatch COMMAND -h`
    describes each; docs/operator.md has a worked example of each with its output.

    \b
    For users:    images, run
    For admins:   ps, doctor, config check, image, cleanup

    \b
    Exit status (all commands, unless a command says otherwise):
      0   success
      65  the request is wrong (fix the command, job or image name)
      69  the node or its configuration needs its admin (`vmbatch doctor`)
      70  internal error of vmbatch (please report it, with the output of -vv)
      75  temporary failure (libvirtd busy, a lock held): try again later
      2   a usage error (unknown option, missing argument)

    \b
    Files:
      /etc/vmbatch/vmbatch.toml, /etc/vmbatch/vmbatch.d/*.toml   the configuration
      docs: admin-guide.md (install, every setting), user-guide.md, operator.md
    """
    logsetup.early("vmbatch", None, _verbosity(verbose))
    ctx.ensure_object(dict)
    ctx.obj["config"] = config_path
    ctx.obj["verbose"] = verbose


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "-i",
    "--image",
    required=True,
    help="Catalog image name (root may also give a path to a local image file).",
)
@click.option(
    "--memory",
    type=click.IntRange(min=64),
    help="Guest memory in MiB (QEMU may use that plus its own overhead: [limits]).",
)
@click.option("--vcpus", type=click.IntRange(min=1), help="Number of guest CPUs.")
@click.option(
    "--user",
    "user",
    metavar="NAME",
    help="Run as this node user (same name, uid, gid, groups) inside the VM; root only."
    " Default: the calling user; for root, log in as [ssh].user (debugging images).",
)
@click.option(
    "--workdir",
    metavar="DIR",
    help="Working directory in the guest (it must exist there). Default: the user's home.",
)
@click.option(
    "--walltime",
    type=click.IntRange(min=0),
    default=0,
    metavar="SECONDS",
    help="End the command (SIGTERM, then SIGKILL after [job].kill_grace) after this long;"
    " 0: no limit.",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def run(
    ctx: click.Context,
    image: str,
    memory: int | None,
    vcpus: int | None,
    user: str | None,
    workdir: str | None,
    walltime: int,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in a fresh VM made from IMAGE, then destroy the VM.

    The command gets the caller's environment (minus host-only variables) and runs
    detached in the guest: its stdout and stderr stream back separately, resumed without
    loss after a dropped connection; vmbatch exits with the command's status (128+N if it
    died of signal N). SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 are passed on to the
    command while it runs (SIGKILL follows a terminating one after [job].kill_grace);
    during boot, SIGINT/SIGTERM destroy the VM and exit 128+N. vmbatch's own failures
    print one line and exit 65 (the request is wrong), 75 (temporary, try again) or 69
    (the node needs its admin). Put the command after `--`.

    Who: root, or a user who may use libvirt's qemu:///system (batch jobs need neither: the
    hooks run as root). Non-root callers run as themselves in the guest.

    \b
    Examples:
        vmbatch run --image demo -- uname -a
        vmbatch run --image alma9 --memory 2048 --vcpus 2 --walltime 3600 -- ./analysis
        vmbatch run --image demo --user alice -- id      # as root: as alice

    Exit status: the command's own; 128+N if it (or vmbatch during boot) died of signal
    N; else vmbatch's: 65 (the request is wrong), 75 (temporary, try again), 69 (the node
    needs its admin)."""
    cfg = _load(ctx)
    root = os.geteuid() == 0
    me = pwd.getpwuid(os.geteuid()).pw_name
    if user is not None and not root and user != me:
        raise JobError(f"only root may run as another user ({user!r})")
    name = user if user is not None else (None if root else me)
    job = interactive(
        image,
        command,
        memory=memory,
        vcpus=vcpus,
        allow_image_path=root,
        identity=JobUser.from_host(name) if name is not None else None,
        environment=dict(os.environ),
        workdir=workdir,
        walltime=walltime,
    )
    logsetup.set_job(job.job_id)
    status = lifecycle.run_job(cfg, job, sys.stdout.buffer, sys.stderr.buffer)
    ctx.exit(status)


@cli.command("doctor")
@click.option("--reprobe", is_flag=True, help="Probe KVM again instead of using the cached answer.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print one JSON document instead of lines: {"ok": BOOL, "status": "ok|warning|'
    'critical", "checks": [{"ok", "severity", "what", "detail", "fix"}, ...]} (severity:'
    " the check's Nagios state, ok/warning/critical).",
)
@click.pass_context
def doctor_cmd(ctx: click.Context, reprobe: bool, as_json: bool) -> None:
    """Check this node and say, line by line, how to fix what is wrong: libvirtd (its
    restarts by vmbatch, its memory), QEMU tools, the accelerator, directories, free space,
    images and cool-offs, the image cache, the scheduler's clients, the paths root's hooks
    write, the metrics file, the log target, leftovers for the reaper (as root), slurm.conf
    (where Slurm answers) and shared filesystems. Lines start with "ok", "WARN" (jobs run,
    some worse or not all) or "FAIL" (the node cannot run jobs), then "fix:" lines. Run as
    root.

    Exit status: 0 if every check passed, 69 otherwise (also for a configuration that
    does not load). For a Nagios-style status line and exit status, see `vmbatch check`.

    \b
    Examples:
        vmbatch doctor
        vmbatch doctor --json | jq '.checks[] | select(.ok | not)'
    """
    try:
        cfg = _load(ctx)
    except ConfigError as exc:
        bad = doctor.Check(
            False, "configuration", str(exc), "`vmbatch config check` lists every problem"
        )
        if as_json:
            click.echo(json.dumps(_doctor_json([bad]), indent=1))
        else:
            click.echo(
                f"FAIL configuration: {exc}\n     fix: `vmbatch config check` lists"
                " every problem; correct the file(s)"
            )
        ctx.exit(CLI[exc.disposition])
    checks = doctor.run_checks(cfg, reprobe=reprobe)
    if as_json:
        click.echo(json.dumps(_doctor_json(checks), indent=1))
    else:
        for check in checks:
            click.echo(check.line())
    ctx.exit(0 if all(c.ok for c in checks) else CLI[ConfigError.disposition])


def _doctor_json(checks: list[doctor.Check]) -> dict[str, object]:
    worst = max((c.status for c in checks), default=doctor.Severity.OK)
    return {
        "ok": all(c.ok for c in checks),
        "status": worst.name.lower(),
        "checks": [c.as_json() for c in checks],
    }


class _PluginUsageError(click.UsageError):
    exit_code = int(doctor.Severity.UNKNOWN)


class _PluginCommand(click.Command):
    """A Nagios plugin's command: a usage error exits 3 (UNKNOWN), as the Monitoring
    Plugins Development Guidelines ask, not click's 2 (which would read as CRITICAL)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _PluginUsageError(exc.format_message(), exc.ctx) from exc


@cli.command("check", cls=_PluginCommand)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1, max=300),
    metavar="SECONDS",
    help="Return after at most this long; checks still running count as CRITICAL."
    " Default: [health].timeout (20).",
)
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="After the status line, one line per check as `vmbatch doctor` prints them"
    " (Nagios shows them as the long output).",
)
@click.option(
    "--take-out",
    is_flag=True,
    help="Act on the result (for Slurm's HealthCheckProgram, which ignores exit statuses):"
    " on CRITICAL drain (Slurm) or offline (Torque) this node with the problem as the"
    " reason; on OK or WARNING return a node vmbatch took out to service. A drain an admin"
    " set or changed is never undone.",
)
@click.pass_context
def check_cmd(ctx: click.Context, timeout: float | None, verbose: bool, take_out: bool) -> None:
    """Check whether this node can run jobs now; print ONE Nagios-style status line.

    "VMBATCH OK - 13 checks passed | checks=13;;;0 time=0.41s;;20;0 ..." or "VMBATCH
    CRITICAL - 1 critical: libvirtd: ... | ...". Checked, within [health].timeout seconds:
    libvirtd answers (within [health].libvirt_timeout), its restart budget, qemu-img and
    QEMU, the accelerator, free space in the job and cache directories, the image cache
    against [cache].max_size_gib, the default image, the scheduler's clients, that the
    state, user, job and cache directories and the accounting log can be written, leftovers
    the reaper would remove without asking the scheduler, and the NFS servers of [mounts].
    Performance data: the checks' count and time, free bytes, cache bytes, orphans.

    Exit status (Nagios plugin API): 0 OK, 1 WARNING (jobs run; some worse or not all),
    2 CRITICAL (the node cannot run jobs, or a check did not finish in time), 3 UNKNOWN
    (not run as root, or the configuration does not load). Run as root: as Slurm's
    HealthCheckProgram (with --take-out), from NHC (check_cmd_status -t 30 vmbatch check),
    or from Nagios/Icinga through sudo (docs/admin-guide.md, "Health checks").

    \b
    Examples:
        vmbatch check -v; echo $?
        vmbatch check --take-out      # as slurm.conf's HealthCheckProgram (scripts/healthcheck)
    """
    from vmbatch import check

    def unknown(text: str) -> None:
        click.echo(f"{check.SERVICE} UNKNOWN - {check.one_line(text)}")
        ctx.exit(int(doctor.Severity.UNKNOWN))

    try:
        cfg = _load(ctx)
    except ConfigError as exc:
        unknown(f"configuration: {exc}")
        return
    if os.geteuid() != 0:
        unknown("run as root: the checks read root-only state and libvirt's system instance")
    limit = timeout if timeout is not None else cfg.health.timeout
    result = check.run(cfg, doctor.health_checks(cfg), limit)
    click.echo(check.status_line(result, limit))
    if verbose:
        for c in result.checks:
            click.echo(c.line())
    if take_out:
        said = check.act(cfg, result, os.environ)
        if said:
            click.echo(said, err=True)
    ctx.exit(int(result.status))


@cli.group("config")
def config_group() -> None:
    """Inspect the configuration (`vmbatch config check`)."""


@config_group.command("check")
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.pass_context
def config_check(ctx: click.Context, file: Path | None) -> None:
    """Validate the configuration (FILE, or the default) offline; list every problem.

    Reads FILE (default: the -c file, $VMBATCH_CONFIG or /etc/vmbatch/vmbatch.toml) and its
    drop-ins (FILE's sibling NAME.d/*.toml, in name order), checks every key's type and
    range, the references between sections (default_image is a catalog image, ...) and the
    site's cloud-config snippet ([context].site_user_data). It does not touch libvirt, the
    network or the images (`vmbatch doctor` does). Each problem is one "error:" line on
    stderr naming the file, section and key; warnings are "warning:" lines.

    \b
    Example:
        vmbatch config check /etc/vmbatch/vmbatch.toml.new && mv ...

    Exit status: 0 if valid (a summary line on stdout), 69 if not."""
    path = file or ctx.obj["config"]
    try:
        cfg = config.load(path)
        if cfg.context.site_user_data is not None:
            nocloud.load_site_user_data(cfg.context.site_user_data)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        click.echo(f"{len(exc.problems)} problem(s) found", err=True)
        ctx.exit(CLI[exc.disposition])
    injected = sorted(n for n, img in cfg.images.items() if img.context == "inject")
    if cfg.context.site_user_data is not None and injected:
        click.echo(
            "warning: [context].site_user_data is cloud-config and is not applied to images"
            f' with context = "inject" ({", ".join(injected)})',
            err=True,
        )
    files = ", ".join(str(f) for f in cfg.files) or "no file (all defaults)"
    click.echo(
        f"configuration OK: {files}; {len(cfg.images)} image(s): "
        + (", ".join(sorted(cfg.images)) or "none")
    )


@cli.command("ps")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects instead.")
@click.pass_context
def ps(ctx: click.Context, as_json: bool) -> None:
    """List the job VMs on this node: one line per job.

    \b
    JOB     the scheduler's job id (Torque ids in full: 123[4].server.example.org)
    USER    the job's user           IMAGE   its catalog image
    STATE   libvirt's state of its VM: running, paused, ...; "-": no VM (kept disks, or
            a prologue still making it)
    PHASE   the batch state record: preparing, ready, failed, kept:paused / kept:disks
            (with the time left before the reaper removes it); run: `vmbatch run`;
            ready:paused(REASONS): paused by vmbatch for an operator, the scheduler's
            suspend or a checkpoint
    AGE     since its prologue (or run) began
    CPUS, MEM   the VM's vCPUs and memory      SSH   its SSH port on 127.0.0.1
    ACCEL   kvm or tcg

    Root sees everything. Other users see the VMs through a read-only libvirt
    connection (no PHASE; SSH only for their own jobs); where libvirt refuses them, the
    message says how to get access (root, or a polkit rule / the socket's group).

    --json prints a list of objects with the keys job_id, user, scheduler, image, domain,
    state, phase, started, age_seconds, vcpus, memory_mib, ssh_port, accelerator,
    kept_as, kept_until (always all of them; null where not known).

    Exit status: 0; 65 if libvirt refuses the caller; 69 if libvirtd cannot be reached.

    \b
    Example:
        vmbatch ps
        vmbatch ps --json | jq '.[] | select(.user == "alice") | .job_id'
    """
    from vmbatch import ops

    cfg = _load(ctx)
    root = os.geteuid() == 0
    rows = ops.ps_rows(cfg, root=root)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows], indent=2, sort_keys=True))
        return
    for line in ops.ps_table(rows):
        click.echo(line)
    if not root:
        click.echo("(PHASE is root's to see: the batch state records are root-only)", err=True)


@cli.command("logs")
@click.argument("job_id", metavar="JOB")
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Then print new lines as they come, until the job's VM is gone (its job"
    " directory is removed), the job is kept for inspection, or Ctrl-C.",
)
@click.option(
    "-n",
    "--lines",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    metavar="N",
    help="Print the last N lines of each log first (0: none).",
)
@click.pass_context
def logs(ctx: click.Context, job_id: str, follow: bool, lines: int) -> None:
    """Show the logs of JOB's VM (root only): its serial console (the guest's kernel and
    boot messages, written by virtlogd) and vmbatch's own lines for the job, each line
    labelled [console] or [vmbatch], control characters shown as ^X (what the guest
    printed must not steer your terminal). After the job's VM is gone, the kept copy of
    its console log ([paths].console_log_dir) if there is one. --follow ends when the VM
    is gone or the job is kept for inspection ([batch].keep_failed).

    The console is root's: a job's user can look inside their running job with `vmbatch
    ssh JOB` (e.g. `vmbatch ssh JOB -- dmesg`) instead.

    Exit status: 0; 65 if there is no such job here or the caller is not root.

    \b
    Example:
        vmbatch logs 4242 --lines 20
        vmbatch logs --follow '123[4].torque.example.org'
    """
    from vmbatch import ops
    from vmbatch.hooks import batch

    cfg = _load(ctx)
    batch.check_job_id(job_id)
    if os.geteuid() != 0:
        raise JobError(
            f"the logs of job {job_id} are root's (the console log is written by virtlogd"
            " as root in a root-only directory)",
            hint=f"look inside your job's VM with `vmbatch ssh {job_id}` (e.g. `vmbatch ssh"
            f" {job_id} -- dmesg`), or ask the admin for `vmbatch logs {job_id}`",
        )
    ops.show_logs(cfg, job_id, sys.stdout, lines=lines, follow=follow)


@cli.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("job_id", metavar="JOB")
@click.option(
    "--root",
    "as_root",
    is_flag=True,
    help="(root only) Log in as root in the guest. Only VMs booted with [mounts] have a"
    " login for root (vmbatch authorizes its key to mount them); others refuse.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def ssh_cmd(ctx: click.Context, job_id: str, as_root: bool, command: tuple[str, ...]) -> None:
    """Log in to the VM of running job JOB: a shell, or COMMAND after `--`.

    The way to debug a running job, as `srun --jobid=N --overlap --pty bash` is on bare
    metal: the job's own user logs in as themself with the job's key, checked against the
    guest's pinned host key; root may too (as the job's user, or as root with --root).
    Anyone else is refused, with the owner's name. A shell gets a terminal when stdin is
    one; a command's stdout and stderr come back separately, stdin is passed on.

    Exit status: COMMAND's (the shell's), 255 if the connection ended without one;
    65 if the job has no VM here or the caller may not log in; 75 if the guest did not
    answer.

    \b
    Example:
        vmbatch ssh 4242
        vmbatch ssh 4242 -- top -b -n 1
        vmbatch ssh '123[4].torque.example.org' -- tail -f /var/tmp/vmbatch-*/stdout
    """
    from vmbatch import ops
    from vmbatch.hooks import batch

    cfg = _load(ctx)
    batch.check_job_id(job_id)
    endpoint = ops.login_for(cfg, job_id, as_root=as_root)
    try:
        status = ops.run_ssh(endpoint, command)
    except GuestConnectionError as exc:
        if os.geteuid() != 0:  # root was told before connecting (it can ask libvirt)
            exc.hint = (f"{exc.hint}; " if exc.hint else "") + (
                "if the job has ended and its VM was kept for inspection, the VM is paused"
                " and answers nothing until the admin resumes it"
            )
        raise
    ctx.exit(status)


@cli.command("console")
@click.argument("job_id", metavar="JOB")
@click.option(
    "--force",
    is_flag=True,
    help="Take the console from another session that holds it (it is disconnected).",
)
@click.pass_context
def console_cmd(ctx: click.Context, job_id: str, force: bool) -> None:
    """Attach to the serial console of JOB's VM (root only), as `virsh console` does:
    what the guest writes shows here, what you type goes to the guest's serial port.
    Leave with Ctrl-] (the escape character). The console log keeps being written
    meanwhile (`vmbatch logs`).

    Exit status: 0 when left or the console closed; 65 if there is no such VM or the
    caller is not root; 69 if libvirtd cannot be reached.

    \b
    Example:
        vmbatch console 4242
    """
    from vmbatch import ops
    from vmbatch.hooks import batch

    cfg = _load(ctx)
    batch.check_job_id(job_id)
    if os.geteuid() != 0:
        raise JobError(
            "only root may attach to a job VM's console",
            hint=f"use `vmbatch ssh {job_id}` to log in to your own job's VM",
        )
    ctx.exit(ops.console(cfg, job_id, force=force))


def _pause_command(ctx: click.Context, job_id: str, action: str) -> None:
    from vmbatch import ops
    from vmbatch.hooks import batch

    cfg = _load(ctx)
    batch.check_job_id(job_id)
    if os.geteuid() != 0:
        raise JobError(f"only root may {action} a job's VM")
    click.echo(ops.suspend(cfg, job_id) if action == "suspend" else ops.resume(cfg, job_id))


@cli.command("suspend")
@click.argument("job_id", metavar="JOB")
@click.pass_context
def suspend_cmd(ctx: click.Context, job_id: str) -> None:
    """Pause the VM of running batch job JOB (root only): its vCPUs stop and its QEMU uses
    no CPU; its memory stays. The job's processes in the guest do not notice; its
    connection to the node waits, and `vmbatch resume JOB` continues it where it was.

    This pauses the VM only: the scheduler still counts the job as running (its time
    limit goes on). No timeout of vmbatch counts the pause, however long. A job the
    scheduler suspends (scontrol suspend, qsig -s suspend) has its VM paused by
    `vmbatch agent` instead; the VM runs again only when neither pause is left.

    \b
    Example:
        vmbatch suspend 4242 && vmbatch ps

    Exit status: 0 (also when it was paused already); 65 if JOB is no running batch job
    here or the caller is not root; 75 if libvirtd or the job's lock is busy."""
    _pause_command(ctx, job_id, "suspend")


@cli.command("resume")
@click.argument("job_id", metavar="JOB")
@click.pass_context
def resume_cmd(ctx: click.Context, job_id: str) -> None:
    """Continue the VM of batch job JOB that `vmbatch suspend` paused (root only).

    A VM paused otherwise (its job suspended by the scheduler, kept for inspection after
    its job failed, or by hand with virsh) is left as it is: the scheduler's pause ends
    with the scheduler's resume.

    \b
    Example:
        vmbatch resume 4242

    Exit status: 0 (also when there was nothing to continue); 65 if JOB is no running
    batch job here or the caller is not root; 75 if libvirtd or the job's lock is busy."""
    _pause_command(ctx, job_id, "resume")


@cli.command("migrate")
@click.argument("job_id", metavar="JOB")
@click.option(
    "--to",
    "dest_uri",
    required=True,
    metavar="URI",
    help="The destination's libvirt URI (e.g. qemu+ssh://node2/system).",
)
@click.option(
    "--dest-dir",
    type=click.Path(path_type=Path),
    default=None,
    metavar="DIR",
    help="Where the job's files go at the destination: DIR/JOB  [default: [paths].job_dir]."
    " It must be on this host's file system as the destination's libvirtd sees it.",
)
@click.option(
    "--migrate-uri",
    default=None,
    metavar="URI",
    help="Where the destination's QEMU takes the memory stream (tcp://HOST:PORT or"
    " unix:///PATH)  [default: libvirt's, the destination's host name].",
)
@click.option(
    "--disks-uri",
    default=None,
    metavar="URI",
    help="Where the destination's NBD server takes the disks (tcp://HOST:PORT or"
    " unix:///PATH)  [default: libvirt's].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(1.0, 86400.0),
    default=600.0,
    show_default=True,
    help="Seconds the migration may take; after them it is aborted and the VM runs on here.",
)
@click.pass_context
def migrate_cmd(
    ctx: click.Context,
    job_id: str,
    dest_uri: str,
    dest_dir: Path | None,
    migrate_uri: str | None,
    disks_uri: str | None,
    timeout: float,
) -> None:
    """Move the running VM of batch job JOB to another libvirtd while it runs (root only):
    live migration, its disks' job layers copied (the image itself must be on the
    destination, identical). The job does not notice beyond a pause of about a second;
    its output stays complete and its exit status its own.

    The job stays this node's: its starter keeps reaching the VM through the same
    loopback port here, which `vmbatch agent` (it must run) relays to the VM's new SSH
    forward; the job's state record says where the VM runs, and its epilogue (or
    `vmbatch cleanup JOB`) destroys it there. Across the switch the job's connection
    waits without counting time (a pause for the reason "migration"; the VM itself
    runs). Refused, with nothing changed, for a job that is not running, paused, already
    migrated, or whose VM the destination cannot take (docs/admin-guide.md, "Live
    migration", also says what a migration between real nodes still needs).

    \b
    Example:
        vmbatch migrate 4242 --to qemu+ssh://node2/system

    Exit status: 0 when the VM runs at the destination and its relay listens; 65 if JOB
    is no running batch job here or the caller is not root; 75 if the migration was
    refused or failed (the message says whether the VM runs on here, which it does
    unless it says otherwise), or libvirtd or the job's lock is busy."""
    from vmbatch import migrate
    from vmbatch.hooks import batch

    cfg = _load(ctx)
    batch.check_job_id(job_id)
    if os.geteuid() != 0:
        raise JobError("only root may migrate a job's VM")
    if dest_dir is not None and not dest_dir.is_absolute():
        raise click.BadParameter("must be an absolute path", param_hint="--dest-dir")
    moved = migrate.migrate_job(
        cfg,
        job_id,
        dest_uri,
        dest_base=dest_dir,
        uri=migrate_uri,
        disks_uri=disks_uri,
        timeout=timeout,
    )
    r = moved.result
    click.echo(
        f"job {job_id}: VM {r.name} runs at {r.dest_uri} ({moved.dest_dir}); downtime"
        f" {r.downtime_ms} ms, migration {r.total_ms} ms; its starter reaches it through"
        f" 127.0.0.1:{moved.relay_port} here, relayed to {moved.relay_to}"
    )


@cli.command("agent")
@click.option(
    "--interval",
    type=click.FloatRange(0.05, 10.0),
    default=0.25,
    show_default=True,
    help="Seconds between two looks at the running jobs' processes.",
)
@click.pass_context
def agent_cmd(ctx: click.Context, interval: float) -> None:
    """Run the node agent (root; the vmbatch-agent systemd service runs it): pause the
    VM of a job that the scheduler suspends, and continue it when the scheduler resumes
    the job.

    Slurm (scontrol suspend, preemption with PreemptMode=SUSPEND) and Torque (qsig -s
    suspend) stop a suspended job's processes but not its VM, which is not one of them.
    The agent watches the job starters of the node's running jobs, found through the
    scheduler's own root processes (slurmstepd, pbs_mom), and pauses the VM
    (virDomainSuspend) when all of a job's tasks are stopped or frozen, and continues it
    when they run again. It runs until SIGTERM or SIGINT; without it, a suspended job's
    VM runs on (`vmbatch doctor` says so).

    It also runs the relays of jobs whose VM `vmbatch migrate` moved: each listens on
    the job's old loopback SSH port here and forwards to the VM's new forward, until the
    job's epilogue removes its record.

    \b
    Example:
        systemctl enable --now vmbatch-agent

    Exit status: 0 after SIGTERM or SIGINT; 65 if the caller is not root or the
    configuration is invalid."""
    from vmbatch import agent

    cfg = _load(ctx)
    if os.geteuid() != 0:
        raise JobError("only root may run the vmbatch agent")
    agent.serve(cfg, interval)


@cli.command("checkpoint")
@click.argument("job_id", metavar="JOB")
@click.option(
    "--continue",
    "then",
    flag_value="continue",
    default=True,
    help="After the checkpoint the VM runs on (the default). Its SSH port changes; the"
    " job's starter follows the job there by itself.",
)
@click.option(
    "--stop",
    "then",
    flag_value="stop",
    help="After the checkpoint the VM stays stopped: the job's starter exits with"
    " [batch].requeue_exit (Slurm's RequeueExit requeues the job), the epilogue keeps the"
    " checkpoint, and the job's next run, on any node that sees [checkpoint].dir, continues"
    " from it.",
)
@click.pass_context
def checkpoint_cmd(ctx: click.Context, job_id: str, then: str) -> None:
    """Checkpoint the VM of running batch job JOB to disk (root only): its memory and
    device state (libvirt's save) and copies of its disks and keys, in
    [checkpoint].dir/JOB/GENERATION with a manifest of checksums, written under a
    temporary name and renamed when complete; the previous generation is removed only
    then. The VM is paused while the checkpoint is written (seconds for a small guest:
    its memory size decides).

    When the job runs again (requeued), its prologue restores the newest checkpoint that
    verifies instead of booting afresh, and the job's starter follows the job already
    running in it, from the first byte of its output. A checkpoint that does not verify
    (a file changed since it was taken, the base image or the vmbatch/QEMU version
    differs) is refused with the reason; [checkpoint].on_bad says whether the job then
    starts afresh or is held. The checkpoints go when the job ends for good.

    \b
    Example:
        vmbatch checkpoint 4242            # checkpoint, the job runs on
        vmbatch checkpoint --stop 4242     # requeued; its next run continues it

    Exit status: 0 when the checkpoint is complete; 65 if JOB is no running batch job
    here or the caller is not root; 75 if libvirtd, the disk or the job's lock failed
    (the job runs on: from the save if its VM was saved already); 69 if libvirtd cannot
    be reached."""
    from vmbatch import checkpoint
    from vmbatch.hooks import batch

    cfg = _load(ctx)
    batch.check_job_id(job_id)
    if os.geteuid() != 0:
        raise JobError("only root may checkpoint a job's VM")
    taken = checkpoint.take(cfg, job_id, then="stop" if then == "stop" else "continue")
    cp = taken.checkpoint
    size = cp.size() / 2**20
    where = f"checkpoint {cp.generation} of job {job_id} in {cp.path} ({size:.0f} MiB,"
    if taken.port is not None:
        click.echo(f"{where} {taken.seconds:.1f}s); the VM runs on, SSH on port {taken.port}")
    else:
        click.echo(
            f"{where} {taken.seconds:.1f}s); the VM is stopped: the job's next run continues"
            " from it"
        )


@cli.command("cleanup")
@click.argument("job_ids", nargs=-1)
@click.option(
    "--stale",
    is_flag=True,
    help="Run the reaper: remove every VM, QEMU process, injection appliance, job file,"
    " user directory, state record, image in-use marker and dead download that no live"
    " job owns (batch jobs the scheduler no longer runs here, older than [batch].reap_grace;"
    " `vmbatch run` jobs whose process is gone; anything from before the last reboot); and"
    " if vmbatch drained (Slurm) or offlined (Torque) this node and its reason is unchanged,"
    " return it to service once the node checks of `vmbatch doctor` pass.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="With --stale: only list what would be removed, and why.",
)
@click.pass_context
def cleanup(ctx: click.Context, job_ids: tuple[str, ...], stale: bool, dry_run: bool) -> None:
    """Finish what the batch epilogue could not: destroy the VM of each JOB_ID and remove
    its disks, keys, user directory and state record (as the epilogue does, without an
    accounting line), and its checkpoints ([checkpoint].dir), also those kept for its
    requeue. Safe for jobs that are already gone. A job kept for inspection
    ([batch].keep_failed, `vmbatch ps` phase kept) is removed at once. A job that a
    prologue or epilogue is working on right now is skipped (exit 75: run it again later).

    With --stale (as root; from cron or the vmbatch-reaper systemd timer), one line per
    thing removed goes to stdout: "job 42: domain vmbatch-42 destroyed, ... (job no longer
    known to Slurm)". What is left alone although it looks stale goes to stderr, with the
    reason. Nothing of a job that still runs is ever touched (docs/admin-guide.md,
    "Reaper"). A Slurm job's checkpoints outlive its other files (it may have been
    requeued); they go once squeue says the job ended.

    \b
    Examples:
        vmbatch cleanup 4242 4243
        vmbatch cleanup --stale --dry-run

    Exit status: 0; 75 if a job was skipped (a hook holds it) or the reaper left something
    undecided (scheduler or libvirtd unreachable) or not removed; 69 if the configuration
    is invalid."""
    from vmbatch import reaper
    from vmbatch.hooks import batch

    cfg = _load(ctx)
    if not job_ids and not stale:
        raise click.UsageError("name job ids, or --stale")
    if dry_run and not stale:
        raise click.UsageError("--dry-run works with --stale")
    problems: list[str] = []
    if stale:
        from vmbatch.doctor import node_checks
        from vmbatch.hooks.policy import resume_node

        said = resume_node(
            cfg, failing=lambda: [f"{c.what}: {c.detail}" for c in node_checks(cfg) if not c.ok]
        )
        if said:
            click.echo(said)
        report = reaper.reap(cfg, dry_run=dry_run, env=os.environ)
        for line in report.removed:
            click.echo(line)
        for line in report.skipped + report.undecided + report.failed:
            click.echo(line, err=True)
        if dry_run and not (report.removed or report.skipped or report.undecided):
            click.echo("nothing stale: the reaper would remove nothing", err=True)
        problems += report.undecided + report.failed
    busy = []
    for job_id in dict.fromkeys(job_ids):
        try:
            batch.finish(cfg, batch.check_job_id(job_id), checkpoints="drop")
        except JobBusyError as exc:  # a hook is on it right now: never tear down under it
            click.echo(f"job {job_id}: skipped: {exc}", err=True)
            busy.append(job_id)
            continue
        click.echo(f"job {job_id}: cleaned up")
    if busy:
        raise JobBusyError(
            f"{len(busy)} job(s) skipped while another vmbatch hook holds them: {' '.join(busy)}",
            hint="run the same command again later",
        )
    if problems:
        raise HostError(
            f"the reaper left {len(problems)} thing(s) undecided or not removed (listed above)",
            hint="run `vmbatch cleanup --stale` again once the scheduler and libvirtd answer",
        )


@cli.command("images")
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Also list catalog images batch jobs may not choose (only `vmbatch run` can use them).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(offer.FORMATS),
    default="text",
    show_default=True,
    help="text: a table for the terminal; json: for scripts; markdown or html: a page the"
    " admin publishes for users.",
)
@click.pass_context
def images_cmd(ctx: click.Context, everything: bool, fmt: str) -> None:
    """List the images your batch jobs may run in, for users (no root or libvirt needed).

    Reads only the configuration (/etc/vmbatch, world-readable): the default image, used
    when the job script has no `#VMBATCH image=` line, then every other image a job may
    choose with `#VMBATCH image=NAME`, each with the site's one-line description
    ([images.NAME].description). Works on any host with vmbatch and its configuration,
    a login node included. The node's image cache is `vmbatch image list` (admins).

    \b
    Examples:
        vmbatch images
        vmbatch images --format html > /var/www/html/vmbatch-images.html

    Exit status: 0; 69 if the configuration cannot be read or is invalid (the admin
    fixes it: `vmbatch config check`)."""
    cfg = _load(ctx)
    listed = offer.offered(cfg, everything=everything)
    if not listed and fmt == "text":
        click.echo(
            "no images are offered to batch jobs here ([batch].default_image and"
            " user_images are empty)",
            err=True,
        )
        return
    click.echo(offer.render(listed, fmt), nl=False)


#: ``vmbatch report``'s read errors: sysexits(3) status and what to do.
_REPORT_ERRORS: dict[type[OSError], tuple[int, str]] = {
    FileNotFoundError: (
        66,  # EX_NOINPUT
        "no such accounting log: no batch job has ended on this node yet, or"
        " [batch].accounting_log (or --file) names another file",
    ),
    PermissionError: (
        77,  # EX_NOPERM
        "not allowed to read it: the accounting log is root's (mode 0640); run as root or"
        " as a member of its group",
    ),
}


@cli.command("report")
@click.option(
    "--since",
    metavar="WHEN",
    help="Only jobs whose accounting line was written at or after WHEN: now, a duration"
    " before now (90s, 30m, 2h, 7d, 1w), @EPOCH, or an ISO 8601 date or time (2026-11-30,"
    " 2026-11-30T09:00; local time unless it has an offset). Default: all.",
)
@click.option(
    "--until",
    metavar="WHEN",
    help="Only jobs accounted before WHEN (same forms as --since). Default: all.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option(
    "--file",
    "files",
    multiple=True,
    metavar="PATH",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Accounting log to read instead of [batch].accounting_log; repeat it to read"
    " several (e.g. logrotate's accounting.jsonl.1 and .2.gz: .gz is read through gzip).",
)
@click.pass_context
def report_cmd(
    ctx: click.Context,
    since: str | None,
    until: str | None,
    as_json: bool,
    files: tuple[Path, ...],
) -> None:
    """Summarise the batch jobs of this node from its accounting log.

    One line per job is written by the batch epilogue to [batch].accounting_log
    (docs/admin-guide.md, "Accounting"). The report gives the number of jobs, how many
    failed (the script did not run, or the scheduler reports a non-zero exit status or a
    signal) and why, grouped by cause; boot-time percentiles (p50, p90, p99, max;
    nearest rank); and per image and per user the jobs, failures, mean and median boot
    time, total run time of the scripts and total CPU seconds of the VMs' QEMU. Lines of
    older vmbatch versions are read with what they have; unreadable lines (a last line cut
    short) are skipped and counted.

    The log is root's (mode 0640): run as root, or as a member of the file's group.

    Exit status: 0 (a report, also of no jobs), 2 (bad option or time), 66 (a log file
    does not exist), 77 (not allowed to read it), 74 (another read error).

    Example, the last week as JSON:

        vmbatch report --since 7d --json
    """
    from vmbatch import report

    now = time.time()
    try:
        start = report.parse_when(since, now) if since is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    try:
        end = report.parse_when(until, now) if until is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--until") from None
    paths = list(files) or [_load(ctx).batch.accounting_log]
    try:
        records = report.read(paths, start, end)
    except OSError as exc:
        status, why = _REPORT_ERRORS.get(type(exc), (74, exc.strerror or str(exc)))
        click.echo(f"vmbatch: error: {exc.filename or paths[0]}: {why}", err=True)
        ctx.exit(status)
    summary = report.summarise(records)
    if records.skipped:
        click.echo(f"vmbatch: {records.skipped} unreadable line(s) skipped", err=True)
    if as_json:
        click.echo(json.dumps({"files": [str(p) for p in paths], **summary}, sort_keys=True))
    else:
        click.echo(report.render(summary, [str(p) for p in paths]), nl=False)


@cli.group("image")
def image_group() -> None:
    """Manage the node's image cache (remote and file:// catalog images), as root.

    Images from http(s):// and file:// sources are fetched once per node into
    [paths].cache_dir/images and verified; local-path images are used in place. Jobs fetch
    on first use; these commands let an admin pre-fetch, check and trim the cache. What
    users may choose is `vmbatch images`."""


def _entry(cfg: config.Config, name: str) -> config.ImageConfig:
    entry = cfg.images.get(name)
    if entry is None:
        raise UnknownImageError(
            f"unknown image {name!r}",
            hint="known images: " + (", ".join(sorted(cfg.images)) or "none"),
        )
    return entry


@image_group.command("list")
@click.pass_context
def image_list(ctx: click.Context) -> None:
    """Catalog images: source, whether cached, size, last use, jobs using it.

    One line per [images.NAME]: CACHED is "yes"/"no" for fetched images and "local" for
    images used in place; SIZE the cached file; LAST USED when a job last marked it in use;
    JOBS how many running jobs use it now (they pin it against eviction).

    \b
    Example:
        vmbatch image list

    Exit status: 0; 69 if the configuration is invalid."""
    cfg = _load(ctx)
    cache = ImageCache(cfg)
    cached = {e.path: e for e in cache.entries()}
    click.echo(f"{'NAME':16} {'CACHED':7} {'SIZE':>10} {'LAST USED':20} {'JOBS':6} SOURCE")
    for name in sorted(cfg.images):
        entry = cfg.images[name]
        if not is_cached_source(entry):
            click.echo(f"{name:16} {'local':7} {'':>10} {'':20} {'':6} {entry.source}")
            continue
        e = cached.get(cache.path_for(entry))
        used = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
            if (e and e.last_used)
            else "-"
        )
        size = f"{e.size / 2**20:.1f}M" if e else "-"
        jobs = str(len(e.jobs)) if e else "-"
        click.echo(
            f"{name:16} {'yes' if e else 'no':7} {size:>10} {used:20} {jobs:6} {entry.source}"
        )


@image_group.command("cooloff")
@click.option("--clear", "clear", metavar="NAME", help="Lift NAME's cool-off on this node.")
@click.option("--clear-all", is_flag=True, help="Lift every image's cool-off on this node.")
@click.pass_context
def image_cooloff(ctx: click.Context, clear: str | None, clear_all: bool) -> None:
    """Images that failed on this node lately, and those refused here for a cool-off
    ([batch].image_failures within image_failure_window: refused for image_cooloff s).
    With --clear NAME (root), jobs may use NAME here again at once: after the image or its
    catalog entry was fixed.

    \b
    Examples:
        vmbatch image cooloff
        vmbatch image cooloff --clear alma9

    Exit status: 0; 69 if the configuration is invalid."""
    from vmbatch.hooks.policy import ImageHealth

    cfg = _load(ctx)
    health = ImageHealth(cfg)
    if clear or clear_all:
        for name in health.clear(None if clear_all else clear):
            click.echo(f"{name}: cool-off lifted, failures forgotten")
        return
    now = time.time()
    click.echo(f"{'NAME':16} {'FAILURES':8} {'REFUSED UNTIL':20} LAST ERROR")
    for st in health.statuses():
        until = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.refused_until))
            if st.refused_until > now
            else "-"
        )
        click.echo(f"{st.name:16} {len(st.failures):<8} {until:20} {st.last_error[:100]}")


@image_group.command("pull")
@click.argument("name")
@click.pass_context
def image_pull(ctx: click.Context, name: str) -> None:
    """Fetch and verify image NAME into the cache now (waits if another job fetches it).

    A progress bar goes to stderr on a terminal; the cached path to stdout. Use it to warm
    a node's cache before jobs arrive, or after changing an entry's checksum.

    \b
    Example:
        vmbatch image pull alma9

    Exit status: 0; 65 for an unknown NAME, a checksum mismatch or a source that cannot be
    used (404, wrong format); 75 if the download failed for a reason that may pass or the
    disk is too full (retry later)."""
    cfg = _load(ctx)
    entry = _entry(cfg, name)
    if not is_cached_source(entry):
        click.echo(f"{name}: local image {entry.source}, nothing to pull")
        return
    if sys.stderr.isatty():
        with click.progressbar(length=0, label=f"pulling {name}", file=sys.stderr) as bar:

            def progress(done: int, total: int | None) -> None:
                bar.length = total or 0
                bar.update(done - bar.pos)

            path = ImageCache(cfg).ensure(entry, progress)
    else:
        path = ImageCache(cfg).ensure(entry)
    click.echo(f"{name}: {path}")


@image_group.command("verify")
@click.argument("name", required=False)
@click.pass_context
def image_verify(ctx: click.Context, name: str | None) -> None:
    """Re-hash cached images (NAME, or all); a corrupt copy is removed and refetched on use.

    Each cached file is compared with the catalog checksum (or, for unpacked or unverified
    images, with the checksum recorded when it was fetched).

    \b
    Example:
        vmbatch image verify

    Exit status: 0 if nothing was corrupt; 65 if a copy was corrupt (removed)."""
    cfg = _load(ctx)
    cache = ImageCache(cfg)
    bad = 0
    for n in [name] if name else sorted(cfg.images):
        entry = _entry(cfg, n)
        ok = cache.verify(entry) if is_cached_source(entry) else None
        bad += ok is False
        click.echo(
            f"{n}: "
            + {
                True: "ok",
                False: "CORRUPT, removed",
                None: "not checked (not cached, local, or nothing recorded to compare with)",
            }[ok]
        )
    ctx.exit(CLI[ImageError.disposition] if bad else 0)


@image_group.command("rm")
@click.argument("name")
@click.pass_context
def image_rm(ctx: click.Context, name: str) -> None:
    """Remove image NAME from the cache (refused while a job uses it).

    \b
    Example:
        vmbatch image rm alma9

    Exit status: 0 (also when it was not cached); 65 for an unknown NAME; 75 if a job uses
    it or it is being fetched (try again later)."""
    cfg = _load(ctx)
    cache = ImageCache(cfg)
    path = cache.path_for(_entry(cfg, name))
    if not path.exists():
        click.echo(f"{name}: not cached")
    elif cache.remove(path):
        click.echo(f"{name}: removed {path}")
    else:
        raise HostError(f"image {name!r} is in use by a job or being fetched; not removed")


@image_group.command("prune")
@click.pass_context
def image_prune(ctx: click.Context) -> None:
    """Evict least-recently-used cached images not in use down to [cache].max_size_gib.

    Jobs do the same before each download; images in use are never evicted. One "evicted
    PATH" line per file removed.

    \b
    Example:
        vmbatch image prune

    Exit status: 0; 69 if the configuration is invalid."""
    cfg = _load(ctx)
    for path in ImageCache(cfg).prune():
        click.echo(f"evicted {path}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: the one place VmBatchError becomes a message and an exit code."""
    try:
        status = cli.main(args=argv, prog_name="vmbatch", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("vmbatch: aborted", err=True)
        return 128 + 2
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except JobInterruptedError as exc:
        click.echo(f"vmbatch: {exc}; the VM was destroyed", err=True)
        return 128 + exc.signum
    except VmBatchError as exc:
        log.debug("error detail", exc_info=True)
        click.echo(f"vmbatch: error: {exc}", err=True)
        return CLI[exc.disposition]
    except Exception:  # an unexpected error must never look like success
        log.exception("internal error")
        click.echo("vmbatch: internal error (see the log above); please report it", err=True)
        return CLI_INTERNAL_ERROR
    return status if isinstance(status, int) else 0


def entry() -> None:
    sys.exit(main())
