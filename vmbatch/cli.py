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

from vmbatch import __version__, config, doctor, lifecycle
from vmbatch.contextualize import nocloud
from vmbatch.errors import (
    ConfigError,
    HostError,
    ImageError,
    JobBusyError,
    JobError,
    JobInterruptedError,
    UnknownImageError,
    VmBatchError,
)
from vmbatch.hooks.exitcodes import CLI, CLI_INTERNAL_ERROR
from vmbatch.images.cache import ImageCache, is_cached_source
from vmbatch.job import JobUser, interactive

log = logging.getLogger("vmbatch")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, format="vmbatch: %(levelname)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("paramiko").setLevel(max(level, logging.WARNING))


def _load(ctx: click.Context) -> config.Config:
    path: Path | None = ctx.obj["config"]
    # As root, only a configuration (and directories) that root alone controls.
    return config.load(path, as_root=os.geteuid() == 0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, verbose: int) -> None:
    """Run batch jobs in throw-away virtual machines."""
    _setup_logging(verbose)
    ctx.ensure_object(dict)
    ctx.obj["config"] = config_path


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
    (the node needs its admin). Put the command after `--`:

        vmbatch run --image demo -- uname -a
    """
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
    status = lifecycle.run_job(cfg, job, sys.stdout.buffer, sys.stderr.buffer)
    ctx.exit(status)


@cli.command("doctor")
@click.option("--reprobe", is_flag=True, help="Probe KVM again instead of using the cached answer.")
@click.pass_context
def doctor_cmd(ctx: click.Context, reprobe: bool) -> None:
    """Check libvirtd (its restarts by vmbatch, its memory), QEMU tools, the accelerator,
    directories and images."""
    try:
        cfg = _load(ctx)
    except ConfigError as exc:
        click.echo(
            f"FAIL configuration: {exc}\n     fix: `vmbatch config check` lists"
            " every problem; correct the file(s)"
        )
        ctx.exit(CLI[exc.disposition])
    checks = doctor.run_checks(cfg, reprobe=reprobe)
    for check in checks:
        click.echo(check.line())
    ctx.exit(0 if all(c.ok for c in checks) else CLI[ConfigError.disposition])


@cli.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("check")
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.pass_context
def config_check(ctx: click.Context, file: Path | None) -> None:
    """Validate the configuration (FILE, or the default) offline; list every problem.

    Also checks the site's cloud-config snippet ([context].site_user_data)."""
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
            (with the time left before the reaper removes it); run: `vmbatch run`
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
    help="Then print new lines as they come, until the job's"
    " VM is gone (its job directory is removed) or Ctrl-C.",
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
    labelled [console] or [vmbatch]. After the job's VM is gone, the kept copy of its
    console log ([paths].console_log_dir) if there is one.

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
    ctx.exit(ops.run_ssh(endpoint, command))


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
    accounting line). Safe for jobs that are already gone. A job kept for inspection
    ([batch].keep_failed, `vmbatch ps` phase kept) is removed at once. A job that a
    prologue or epilogue is working on right now is skipped (exit 75: run it again later).

    With --stale (as root; from cron or the vmbatch-reaper systemd timer), one line per
    thing removed goes to stdout: "job 42: domain vmbatch-42 destroyed, ... (job no longer
    known to Slurm)". What is left alone although it looks stale goes to stderr, with the
    reason; the exit status is 75 if something could not be decided (scheduler or libvirtd
    unreachable) or removed. Nothing of a job that still runs is ever touched
    (docs/admin-guide.md, "Reaper")."""
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
        problems += report.undecided + report.failed
    busy = []
    for job_id in dict.fromkeys(job_ids):
        try:
            batch.finish(cfg, batch.check_job_id(job_id))
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


@cli.group("image")
def image_group() -> None:
    """Manage the node's image cache (remote and file:// catalog images)."""


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
    """Catalog images: source, whether cached, size, last use, jobs using it."""
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
    catalog entry was fixed."""
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
    """Fetch and verify image NAME into the cache now (waits if another job fetches it)."""
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
    """Re-hash cached images (NAME, or all); a corrupt copy is removed and refetched on use."""
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
    """Remove image NAME from the cache (refused while a job uses it)."""
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
    """Evict least-recently-used cached images not in use down to [cache].max_size_gib."""
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
