"""``vmbatch doctor``: check this node and say, line by line, how to fix what is wrong.

Each :class:`Check` also carries a severity, the Nagios state it stands for when it fails
(:mod:`vmbatch.check` turns a chosen subset into one Nagios-style status line):
CRITICAL where the node cannot run jobs (libvirtd, QEMU, directories, free space, the
default image, the scheduler's clients), WARNING where it runs them worse or some of them
not (an image other than the default, cool-offs, libvirtd's restart budget spent, the
cache over its cap, leftovers for the reaper, slurm.conf advice).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import glob
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmbatch import accel, limits, logsetup, process
from vmbatch.config import Config, MountConfig
from vmbatch.errors import MountError, VmBatchError
from vmbatch.guest.mounts import NfsSource
from vmbatch.hooks import slurm
from vmbatch.hooks.batch import host_memory_mib
from vmbatch.images.cache import ImageCache, free_bytes, is_cached_source
from vmbatch.images.catalog import check_trusted, inspect
from vmbatch.images.disks import check_free_space
from vmbatch.libvirt import health
from vmbatch.libvirt.connection import Connection


class Severity(enum.IntEnum):
    """Nagios plugin states, by their exit statuses (Nagios Plugin API, "Return Code"; the
    Monitoring Plugins Development Guidelines): the worse state is the larger number."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report: ok, what was checked, and what to do if not ok.

    ``severity``: how bad a failure of this check is; ``perf``: Nagios performance data
    items (``label=value[UOM];warn;crit;min;max``) it measured."""

    ok: bool
    what: str
    detail: str
    fix: str = ""
    severity: Severity = Severity.CRITICAL
    perf: tuple[str, ...] = ()

    @property
    def status(self) -> Severity:
        """The check's Nagios state: OK, or its severity."""
        return Severity.OK if self.ok else self.severity

    def line(self) -> str:
        mark = {Severity.OK: "ok  ", Severity.WARNING: "WARN"}.get(self.status, "FAIL")
        text = f"{mark} {self.what}: {self.detail}"
        return text + (f"\n     fix: {self.fix}" if not self.ok and self.fix else "")

    def as_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "severity": self.status.name.lower(),
            "what": self.what,
            "detail": self.detail,
            "fix": self.fix,
        }


def run_checks(cfg: Config, *, reprobe: bool = False) -> list[Check]:
    """Every check, in the order an admin would fix things."""
    checks = node_checks(cfg, reprobe=reprobe)
    checks[1:1] = [_restarts(cfg), _memory(cfg)]
    for name in sorted(cfg.images):
        checks.append(_image(cfg, name))
    checks += _cooloffs(cfg)
    checks += [_cache_size(cfg), _scheduler_tools(cfg), *_state_paths(cfg), _metrics_file(cfg)]
    checks += [_log_target(cfg), _agent(cfg)]
    if os.geteuid() == 0:  # the reaper's lock is root's
        checks.append(_orphans(cfg))
    checks += _slurm_checks(cfg)
    for name in sorted(cfg.mounts):
        checks.append(_mount(cfg.mounts[name]))
    return checks


#: One named step of :func:`health_checks`: it returns its checks when run.
Step = tuple[str, Callable[[], list[Check]]]


def health_checks(cfg: Config) -> list[Step]:
    """The checks of ``vmbatch check`` (:mod:`vmbatch.check`): what decides whether this
    node can take jobs now, each cheap, libvirtd asked with ``[health].libvirt_timeout``.
    Not the slurm.conf advice, the other images or libvirtd's memory (``vmbatch doctor``)."""
    lv = cfg.libvirt
    quick = dataclasses.replace(
        cfg, libvirt=dataclasses.replace(lv, timeout=min(lv.timeout, cfg.health.libvirt_timeout))
    )
    steps: list[Step] = [
        ("libvirtd", lambda: [_libvirt(quick)]),
        ("libvirtd restarts", lambda: [_restarts(cfg)]),
        ("qemu-img", lambda: [_tool("qemu-img", cfg.tools.qemu_img, cfg)]),
        ("qemu-system", lambda: [_tool("qemu-system", cfg.tools.qemu_system, cfg)]),
        ("accelerator", lambda: [_accel(cfg, False)]),
        ("free space", lambda: [_free_space(cfg)]),
        ("image cache", lambda: [_cache_size(cfg)]),
        ("default image", lambda: [_default_image(cfg)]),
        ("scheduler clients", lambda: [_scheduler_tools(cfg)]),
        (
            "directories",
            lambda: [
                _directory("job directory", cfg.paths.job_dir),
                _directory("cache directory", cfg.paths.cache_dir),
                *_state_paths(cfg),
            ],
        ),
        ("orphans", lambda: [_orphans(quick)]),
        ("node agent", lambda: [_agent(cfg)]),
    ]
    for name in sorted(cfg.mounts):
        mount = cfg.mounts[name]
        steps.append((f"mount {name}", lambda m=mount: [_mount(m)]))  # type: ignore[misc]
    return steps


def _default_image(cfg: Config) -> Check:
    """``[batch].default_image``: every job that names no image gets it."""
    name = cfg.batch.default_image
    if not name:
        return Check(True, "default image", 'none ([batch].default_image = "": jobs name one)')
    if name not in cfg.images:  # config.load refuses this; a Config made otherwise may not
        return Check(False, "default image", f"{name!r} is not in the catalog", "add it")
    return _image(cfg, name)


def _cache_size(cfg: Config) -> Check:
    """The image cache against ``[cache].max_size_gib`` (it can pass the cap only while
    the images beyond it are in use: eviction skips those)."""
    entries = ImageCache(cfg).entries()
    size = sum(e.size for e in entries)
    cap = int(cfg.cache.max_size_gib * 2**30)
    limit = f"{cap / 2**30:.1f} GiB ([cache].max_size_gib)" if cap else "no cap"
    perf = (f"cache={size}B;{cap or ''};;0;{cap or ''}",)
    detail = f"{len(entries)} image(s), {size / 2**30:.1f} GiB of {limit}"
    if cap and size > cap:
        return Check(
            False,
            "image cache",
            detail + f"; over the cap ({sum(bool(e.jobs) for e in entries)} in use by jobs)",
            "it shrinks as jobs finish (`vmbatch image prune`); or raise [cache].max_size_gib",
            Severity.WARNING,
            perf,
        )
    return Check(True, "image cache", detail, perf=perf)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _scheduler_tools(cfg: Config) -> Check:
    """The scheduler clients the hooks run (hooks run without PATH: [tools] paths)."""
    t = cfg.tools
    what = "scheduler clients"
    slurm_tools = {"scontrol": t.scontrol, "squeue": t.squeue}
    if any(p.exists() for p in slurm_tools.values()):
        missing = [f"{n} ({p})" for n, p in slurm_tools.items() if not _executable(p)]
        if missing:
            return Check(
                False,
                what,
                f"Slurm's {' and '.join(missing)} missing or not executable: the hooks cannot"
                " ask slurmctld about jobs, and the reaper cannot tell which jobs ended",
                "install slurm-client, or set [tools].scontrol and [tools].squeue",
            )
        return Check(True, what, f"Slurm: {t.scontrol}, {t.squeue}")
    if _executable(t.pbsnodes):
        return Check(True, what, f"Torque: {t.pbsnodes}")
    return Check(
        False,
        what,
        f"neither Slurm's {t.scontrol} nor Torque's {t.pbsnodes} is there: the hooks cannot"
        " ask the scheduler about jobs or take the node out of service",
        "install the scheduler's client commands, or set [tools] scontrol/squeue/pbsnodes",
    )


def _state_paths(cfg: Config) -> list[Check]:
    """Where root's hooks write: the job state, the users' directories, the accounting log."""
    b = cfg.batch
    return [
        _writable("state directory", b.state_dir),
        _writable("user directory", b.user_dir),
        _writable("accounting log", b.accounting_log),
    ]


def _writable(label: str, path: Path) -> Check:
    """``path`` (or the nearest directory above it that exists: root makes the rest) can be
    written by this process, on a file system mounted read-write."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fix = f"run as root; check that {path} (or its file system) can be written"
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError as exc:
        return Check(False, label, f"{path}: {exc.strerror}", fix)
    if read_only:
        return Check(False, label, f"{path} is on a read-only file system", fix)
    if not os.access(existing, os.W_OK):
        return Check(False, label, f"{existing} is not writable (uid {os.geteuid()})", fix)
    state = "exists" if path.exists() else f"will be created in {existing}"
    return Check(True, label, f"{path} writable ({state})")


def _metrics_file(cfg: Config) -> Check:
    """``[metrics].textfile``: written only where node_exporter's directory exists."""
    what = "metrics file"
    if not cfg.metrics.textfile:
        return Check(True, what, 'off ([metrics].textfile = "")')
    path = Path(cfg.metrics.textfile)
    if not path.parent.is_dir():
        return Check(
            True,
            what,
            f"not written: {path.parent} does not exist (node_exporter's textfile directory;"
            " install prometheus-node-exporter, or set [metrics].textfile)",
        )
    return Check(True, what, f"{path}")


def _log_target(cfg: Config) -> Check:
    """``[log].target``: can the hooks' lines reach the journal or syslog here?"""
    what = "log target"
    problem = logsetup.target_problem(cfg.log)
    if problem is None:
        where = {"journald": cfg.log.journal_socket, "syslog": cfg.log.syslog_socket}
        return Check(
            True,
            what,
            f"{cfg.log.target}"
            + (
                f" at {where[cfg.log.target]}"
                if cfg.log.target in where
                else " (the hooks' stderr)"
            ),
        )
    return Check(
        False,
        what,
        f"{cfg.log.target}: {problem}",
        "start the journal or a syslog daemon, or set [log].target (and its socket) to one"
        " this node has",
        Severity.WARNING,
    )


def _agent(cfg: Config) -> Check:
    """The node agent runs (``vmbatch agent``): without it a suspended job's VM runs on."""
    from vmbatch import agent

    what = "node agent"
    if os.geteuid() != 0:
        return Check(True, what, "not checked (its pid file is root's)", severity=Severity.WARNING)
    pid = agent.running(cfg)
    if pid is None:
        return Check(
            False,
            what,
            "vmbatch agent is not running: a job the scheduler suspends keeps its VM running",
            'systemctl enable --now vmbatch-agent (docs/admin-guide.md, "Suspend and resume")',
            Severity.WARNING,
        )
    return Check(True, what, f"running (pid {pid}): suspended jobs' VMs are paused")


def _orphans(cfg: Config) -> Check:
    """What the reaper would remove without asking the scheduler (a dry run: leftovers of
    a reboot, lost QEMU processes, dead `vmbatch run` jobs, files no job owns); the
    scheduler is asked only by the reaper itself (``vmbatch cleanup --stale``)."""
    from vmbatch import reaper

    what = "orphans"
    try:
        report = reaper.reap(
            cfg,
            scheduler_check=lambda _s, _j: reaper.Verdict(True, "left to the reaper"),
            dry_run=True,
        )
    except VmBatchError as exc:
        return Check(False, what, f"not counted: {exc}", exc.hint or "", Severity.WARNING)
    n = len(report.removed)
    perf = (f"orphans={n};0;;0",)
    if report.skipped and not report.removed and "another reaper" in report.skipped[0]:
        return Check(True, what, "not counted: the reaper is at work right now", perf=())
    if n:
        shown = "; ".join(report.removed[:3]) + ("; ..." if n > 3 else "")
        return Check(
            False,
            what,
            f"{n} leftover(s) of jobs that no longer run: {shown}",
            "run `vmbatch cleanup --stale` (the vmbatch-reaper timer does, every few minutes)",
            Severity.WARNING,
            perf,
        )
    note = f" ({len(report.undecided)} undecided: see `vmbatch cleanup --stale`)"
    return Check(True, what, "none" + (note if report.undecided else ""), perf=perf)


def node_checks(cfg: Config, *, reprobe: bool = False) -> list[Check]:
    """The checks of the node itself (not of images or shares): what must pass before
    vmbatch returns a node it took out of service (:func:`vmbatch.hooks.policy.resume_node`)."""
    checks = [_libvirt(cfg)]
    checks += [
        _tool("qemu-img", cfg.tools.qemu_img, cfg),
        _tool("qemu-system", cfg.tools.qemu_system, cfg),
    ]
    if any(img.context == "inject" for img in cfg.images.values()):
        checks.append(_guestfish(cfg))
    checks.append(_accel(cfg, reprobe))
    checks += [
        _directory("job directory", cfg.paths.job_dir),
        _directory("cache directory", cfg.paths.cache_dir),
    ]
    if cfg.paths.console_log_dir is not None:
        checks.append(_directory("console log directory", cfg.paths.console_log_dir))
    checks.append(_free_space(cfg))
    checks.append(_limits(cfg))
    return checks


def _limits(cfg: Config) -> Check:
    """[limits]: can libvirt hold VMs to a memory limit here, and what a VM costs."""
    lim = cfg.limits
    what = "resource limits"
    try:
        domain_type = accel.choose(cfg).domain_type
    except VmBatchError:
        domain_type = "qemu"  # reported by the accelerator's own check
    one_gib = limits.hard_limit_mib(cfg, 1024, domain_type)
    usable = host_memory_mib() - cfg.batch.reserve_memory
    detail = (
        f"CPU pinning {'on' if lim.pin_cpus else 'off'}; memory limit"
        f" {'on' if lim.memory_limit else 'off'}; a 1024 MiB guest takes {one_gib} MiB with"
        f" QEMU ({'TCG' if domain_type == 'qemu' else 'KVM'}); VMs may use {usable} MiB of"
        f" this node (its memory less [batch].reserve_memory: the most slurm.conf RealMemory"
        f" should say)"
    )
    if lim.memory_limit and not limits.memory_cgroup_present():
        return Check(
            False,
            what,
            detail + "; but no cgroup memory controller is mounted: libvirt cannot limit VMs",
            "mount the cgroup memory controller (cgroup_enable=memory on the kernel command"
            " line), or set [limits].memory_limit = false",
        )
    return Check(True, what, detail)


def _cooloffs(cfg: Config) -> list[Check]:
    """Images refused on this node after repeated failures (the failure policy)."""
    from vmbatch.hooks.policy import ImageHealth

    checks = []
    for name in sorted(cfg.images):
        try:
            ImageHealth(cfg).check(name)
        except VmBatchError as exc:
            checks.append(
                Check(
                    False,
                    f"image {name}",
                    exc.message,
                    f"once fixed: {exc.hint or ''}",
                    Severity.WARNING,
                )
            )
    return checks


def exit_codes(text: str) -> set[int]:
    """The exit statuses of a slurm.conf list such as ``1-9,18`` (``(null)``: none)."""
    codes: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            codes.update(range(int(low), int(high or low) + 1))
    return codes


def _slurm_checks(cfg: Config) -> list[Check]:
    """What slurm.conf must say for vmbatch (``scontrol show config``); nothing where
    Slurm cannot be asked (no scontrol, Torque)."""
    if not cfg.tools.scontrol.exists() or not slurm.config_present(os.environ):
        return []
    try:
        out = slurm.scontrol(cfg, "show", "config", env=os.environ)
    except VmBatchError:
        return []
    values = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    advice = [_slurm_requeue(cfg, values), _slurm_steps(values)]  # jobs run, some worse
    return [
        *(dataclasses.replace(c, severity=Severity.WARNING) for c in advice),
        *_slurm_scope(cfg, values),
    ]


def _slurm_scope(cfg: Config, values: dict[str, str]) -> list[Check]:
    """Which jobs get a VM here, and whether vmbatch's hooks run beside the site's own
    (docs/admin-slurm.md, "Scope, and living beside a site's own Prolog and job_submit"):
    ``JobSubmitPlugins`` must include ``lua`` (job_submit.lua marks the jobs), the bundle
    it names must be on this node, and ``Prolog``/``Epilog`` - one path or a glob(7)
    pattern, whose matches slurmd runs in reverse lexical order, stopping at the first that
    fails, and none of which is an error that fails every job (22.05
    ``prep_script_slurmd.c``, measured) - must include vmbatch's hook."""
    plugins = values.get("JobSubmitPlugins", "")
    bundle = cfg.slurm.bundle
    checks = [
        Check(
            "lua" in plugins and (bundle / "config.json").is_file(),
            "slurm scope",
            f"jobs that job_submit.lua gives the container {bundle} run in VMs"
            f" (JobSubmitPlugins={plugins or '(null)'}; the bundle is"
            f" {'here' if (bundle / 'config.json').is_file() else 'MISSING on this node'})",
            "JobSubmitPlugins must include lua (conf/slurm/job_submit.lua and vmbatch.lua,"
            " which holds the scope), and [slurm].bundle must be a copy of"
            " conf/slurm/bundle on every node (docs/admin-slurm.md)",
        )
    ]
    for key, hook in (("Prolog", "vmbatch-prologue"), ("Epilog", "vmbatch-epilogue")):
        pattern = values.get(key, "")
        # glob(3) as slurmd expands it, in the order it runs them
        found = glob.glob(pattern) if pattern.startswith("/") else []  # noqa: PTH207
        scripts = sorted(found, reverse=True)
        ours = [s for s in scripts if _mentions(Path(s), hook)]
        if scripts:
            detail = f"{key}={pattern} runs, in this order: {', '.join(scripts)}"
            detail += "" if ours else f": none of them runs {hook}"
        else:
            detail = (
                f"{key}={pattern or '(null)'} matches nothing: slurmd fails every job's"
                f" {key} (and drains the node)"
                if pattern not in ("", "(null)")
                else f"no {key}: vmbatch's {hook} does not run"
            )
        checks.append(
            Check(
                bool(ours),
                f"slurm {key.lower()}",
                detail,
                f"add vmbatch's {key.lower()} beside the site's: {key}=/etc/slurm/"
                f"{key.lower()}.d/* with the site's script and vmbatch's shim in that"
                " directory (conf/slurm/slurm.conf.vmbatch, docs/admin-slurm.md)",
            )
        )
    return checks


def _mentions(script: Path, word: str) -> bool:
    """Does the (small, root's) script ``script`` name ``word``? A shim execs the hook."""
    try:
        with script.open("rb") as f:
            return word.encode() in f.read(65536)
    except OSError:
        return False


def _slurm_steps(values: dict[str, str]) -> Check:
    """``srun`` steps reach the VM only through ``cli_filter.lua`` (docs/admin-slurm.md);
    the TaskProlog is the safety net for steps that do not."""
    plugins = values.get("CliFilterPlugins", "")
    task_prolog = values.get("TaskProlog", "")
    if "lua" not in plugins:
        return Check(
            False,
            "slurm steps",
            f"CliFilterPlugins is {plugins or '(null)'}: srun steps name no container and run"
            " on the node, outside the job's VM",
            "add CliFilterPlugins=lua and install conf/slurm/cli_filter.lua next to slurm.conf"
            " on every host that runs srun (docs/admin-slurm.md)",
        )
    net = f"TaskProlog={task_prolog}" if task_prolog not in ("", "(null)") else "no TaskProlog"
    return Check(True, "slurm steps", f"CliFilterPlugins={plugins}, {net}")


def _slurm_requeue(cfg: Config, values: dict[str, str]) -> Check:
    """``[batch].requeue_exit`` must be in ``RequeueExit`` and ``hold_exit`` in
    ``RequeueExitHold``, or the failure policy's requeue ends the job (``ExitCode=199``)."""
    want = [("RequeueExit", cfg.batch.requeue_exit), ("RequeueExitHold", cfg.batch.hold_exit)]
    missing = [f"{k}={c}" for k, c in want if c and c not in exit_codes(values.get(k, ""))]
    if missing:
        return Check(
            False,
            "slurm requeue",
            f"slurm.conf lacks {' and '.join(missing)}: jobs vmbatch requeues or holds would"
            " fail instead (exit status 199/200)",
            f"add {' '.join(missing)} to slurm.conf (conf/slurm/slurm.conf.vmbatch), then"
            " `scontrol reconfigure`",
        )
    return Check(True, "slurm requeue", ", ".join(f"{k}={c}" for k, c in want if c))


def _free_space(cfg: Config) -> Check:
    reserve = int(cfg.disks.reserve_gib * 2**30)
    perf = []
    for label, path in (
        ("job_dir_free", cfg.paths.job_dir),
        ("cache_dir_free", cfg.paths.cache_dir),
    ):
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        with contextlib.suppress(OSError):
            perf.append(f"{label}={free_bytes(probe)}B;;{reserve}:;0")
    try:
        check_free_space(cfg)
    except VmBatchError as exc:
        return Check(False, "free space", exc.message, exc.hint or "", perf=tuple(perf))
    text = f"at least {cfg.disks.reserve_gib:g} GiB ([disks].reserve_gib)"
    return Check(True, "free space", text, perf=tuple(perf))


def _mount(mount: MountConfig) -> Check:
    """Can this node open a TCP connection to the NFS server (as the guest's NAT will)?"""
    what = f"mount {mount.name}"
    src = NfsSource.parse(mount.source)
    try:
        src.guest_address()  # resolves the name on the node, as a job start does
        socket.create_connection((src.host, src.port), timeout=5).close()
    except (MountError, OSError) as exc:
        return Check(
            False,
            what,
            f"{src.host}:{src.port} not reachable from this node: {exc}",
            f"start the NFS server or fix [mounts.{mount.name}].source; jobs are requeued"
            " until then",
        )
    return Check(True, what, f"{mount.source} -> {mount.path} (server answers on TCP)")


def _libvirt(cfg: Config) -> Check:
    try:
        with Connection(cfg.libvirt) as conn:
            lib, hv = conn.version()
    except VmBatchError as exc:
        return Check(
            False,
            "libvirtd",
            str(exc),
            "start it (`scripts/ensure-libvirtd`, or `systemctl start libvirtd`)"
            " and check [libvirt].uri",
        )
    return Check(True, "libvirtd", f"libvirt {lib}, QEMU {hv} at {cfg.libvirt.uri}")


def _restarts(cfg: Config) -> Check:
    """The restarts vmbatch made of libvirtd in the window, against the budget."""
    lv = cfg.libvirt
    what = "libvirtd restarts"
    if not lv.restart_command or lv.restart_max == 0:
        return Check(True, what, "off ([libvirt].restart_command or restart_max): never restarted")
    try:
        recent = health.in_window(
            health.RestartLog(cfg.batch.state_dir).read(), time.time(), lv.restart_window
        )
    except VmBatchError as exc:
        return Check(True, what, f"unknown: {exc}")
    detail = f"{len(recent)} of {lv.restart_max} allowed in the last {lv.restart_window:.0f} s"
    if recent:
        last = recent[-1]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.time))
        detail += f"; last at {when}: {last.reason}"
    if len(recent) >= lv.restart_max:
        return Check(
            False,
            what,
            detail + "; exhausted: jobs fail while libvirtd does not answer",
            "find out why libvirtd fails (its log) and restart it by hand; the count drops"
            " as restarts age out of [libvirt].restart_window",
            Severity.WARNING,
        )
    return Check(True, what, detail)


def _memory(cfg: Config) -> Check:
    """libvirtd's resident memory against ``[libvirt].max_rss_mib``."""
    lv = cfg.libvirt
    what = "libvirtd memory"
    rss = health.rss_mib(cfg)
    if rss is None:
        detail = f"no live process named by {lv.pid_file}: RSS unknown"
        if lv.max_rss_mib > 0:
            return Check(
                False,
                what,
                detail + ", so [libvirt].max_rss_mib cannot work",
                "set [libvirt].pid_file to the PID file libvirtd writes",
                Severity.WARNING,
            )
        return Check(True, what, detail)
    if lv.max_rss_mib == 0:
        return Check(True, what, f"RSS {rss} MiB (no ceiling: [libvirt].max_rss_mib = 0)")
    over = "; over it: restarted before the next job" if rss > lv.max_rss_mib else ""
    return Check(True, what, f"RSS {rss} MiB, ceiling {lv.max_rss_mib} MiB{over}")


def _tool(label: str, path: Path, cfg: Config, fix: str = "") -> Check:
    try:
        res = process.run([str(path), "--version"], timeout=cfg.tools.command_timeout)
    except VmBatchError as exc:
        return Check(
            False,
            label,
            str(exc),
            fix or f"install qemu-utils/qemu-system-x86 or fix [tools] ({path})",
        )
    first = res.stdout.strip().splitlines()[0] if res.stdout.strip() else "runs"
    return Check(True, label, f"{path}: {first}")


def _guestfish(cfg: Config) -> Check:
    """libguestfs for ``context = "inject"`` images: the tool, and a kernel for its appliance
    (supermin builds the appliance from the host's /boot/vmlinuz-*; launching it is left to
    ``libguestfs-test-tool``, which takes ~20 s under TCG)."""
    fix = "apt-get install libguestfs-tools linux-image-cloud-amd64, or fix [tools].guestfish"
    check = _tool("guestfish (inject)", cfg.tools.guestfish, cfg, fix)
    if not check.ok:
        return dataclasses.replace(check, severity=Severity.WARNING)
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        return Check(
            False,
            check.what,
            "no kernel in /boot for the libguestfs appliance",
            fix,
            Severity.WARNING,
        )
    return Check(True, check.what, f"{check.detail}; appliance kernel {kernels[-1].name}")


def _accel(cfg: Config, reprobe: bool) -> Check:
    try:
        choice = accel.choose(cfg, use_cache=not reprobe)
    except VmBatchError as exc:
        return Check(False, "accelerator", str(exc), exc.hint or "")
    return Check(True, "accelerator", f"{choice.accel.upper()}: {choice.reason}")


def _directory(label: str, path: Path) -> Check:
    """The directory must exist or be creatable, be writable, and be traversable by QEMU,
    which runs as an unprivileged user (a parent with mode 0700, e.g. /root, breaks boot)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        return Check(False, label, f"{path} is not writable", f"create it: mkdir -p {path}")
    for parent in [existing, *existing.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            return Check(
                False,
                label,
                f"{parent} is not traversable by other users (mode {mode & 0o777:o}),"
                " so QEMU cannot reach files below it",
                f"chmod o+x {parent}, or move [paths] under /var/lib or /var/cache",
            )
    state = "exists" if path.exists() else "will be created"
    return Check(True, label, f"{path} ({state})")


def _image(cfg: Config, name: str) -> Check:
    """Check a catalog image without fetching anything: a remote image that is not cached
    yet is reported as such (doctor must not start downloads)."""
    entry = cfg.images[name]
    if is_cached_source(entry):
        cached = ImageCache(cfg).path_for(entry)
        if not cached.exists():
            return Check(
                True,
                f"image {name}",
                f"{entry.source}: not cached yet (fetched on first use, or now with"
                f" `vmbatch image pull {name}`)",
            )
        path = cached
    else:
        path = Path(entry.source)
    try:
        if os.geteuid() == 0:
            check_trusted(entry)  # what a job's prologue would refuse
        fmt, size = inspect(cfg, entry, path)
    except VmBatchError as exc:
        # Only the default image fails every job that names none.
        worst = Severity.CRITICAL if name == cfg.batch.default_image else Severity.WARNING
        return Check(False, f"image {name}", str(exc), exc.hint or "", worst)
    kernel = f", kernel {entry.kernel}" if entry.kernel else ""
    return Check(True, f"image {name}", f"{path} ({fmt}, {size // 2**20} MiB{kernel})")
