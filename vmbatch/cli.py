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
from vmbatch.libvirt.connection import Connection

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
@click.pass_context
def ps(ctx: click.Context) -> None:
    """List the VMs vmbatch runs on this node, with their job metadata."""
    cfg = _load(ctx)
    with Connection(cfg.libvirt) as conn:
        doms = conn.list_vmbatch()
    click.echo(f"{'DOMAIN':40} {'JOB':24} {'USER':12} {'IMAGE':16} SCHEDULER")
    for d in doms:
        m = d.metadata
        if m is None:
            click.echo(f"{d.name:40} (no vmbatch metadata)")
        else:
            click.echo(f"{d.name:40} {m.job_id:24} {m.user:12} {m.image:16} {m.scheduler}")


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
    accounting line). Safe for jobs that are already gone. A job that a prologue or epilogue
    is working on right now is skipped (exit 75: run it again later).

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
