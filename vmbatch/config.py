"""Site configuration: one TOML file plus drop-ins, validated into frozen dataclasses.

Files: ``/etc/vmbatch/vmbatch.toml`` (or the file named by ``VMBATCH_CONFIG``), then every
``*.toml`` in the sibling directory ``<stem>.d/`` (``/etc/vmbatch/vmbatch.d/``) in lexical
order. Later files override earlier ones key by key; tables (such as one image) are merged.
The result is checked as a whole and every problem is reported at once in one
:class:`~vmbatch.errors.ConfigError`. The configuration is parsed once per process and passed
explicitly; nothing reads it at import time. ``conf/vmbatch.toml`` documents every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from vmbatch import trust
from vmbatch.errors import ConfigError

DEFAULT_PATH = Path("/etc/vmbatch/vmbatch.toml")
ENV_VAR = "VMBATCH_CONFIG"

Accel = Literal["auto", "kvm", "tcg"]
ImageFormat = Literal["qcow2", "raw"]
ImageFailure = Literal["fail", "requeue"]
KeepFailed = Literal["no", "paused", "disks"]
OnBadCheckpoint = Literal["fresh", "hold"]
Usr2Action = Literal["checkpoint", "forward"]
#: Contextualization methods (``vmbatch.contextualize.REGISTRY`` has one class per name).
ContextName = Literal["nocloud", "cernvm", "inject"]
LogTarget = Literal["journald", "syslog", "stderr"]
LogLevel = Literal["debug", "info", "warning", "error"]
#: syslog facilities (``vmbatch.logsetup.FACILITIES`` has their codes).
LogFacility = Literal[
    "user", "daemon", "local0", "local1", "local2", "local3", "local4", "local5", "local6",
    "local7",
]  # fmt: skip

_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# They end up in amiconfig ini lines and a shell-sourced µCernVM block: no separators
# (',' ' ' newline) and nothing a shell or ini parser would interpret.
_GROUP = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,31}")  # vmbatch.job.USER_NAME
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PROXY = re.compile(r"[A-Za-z0-9.:/;|@_+%=-]{0,1024}")


@dataclass(frozen=True, slots=True)
class LibvirtConfig:
    """How to reach libvirtd."""

    uri: str = "qemu:///system"
    timeout: float = 30.0
    keepalive_interval: int = 5
    keepalive_count: int = 3
    #: How long teardown keeps trying, on fresh connections, to destroy a VM while
    #: libvirtd is dead or hangs (it may be restarted or resume meanwhile).
    teardown_timeout: float = 120.0
    #: libvirtd health (:mod:`vmbatch.libvirt.health`): the command that restarts libvirtd
    #: when it is dead or does not answer (argv, first item an absolute path; empty: never
    #: restart). The default needs systemd as PID 1; elsewhere name the site's own script.
    restart_command: tuple[str, ...] = ("/usr/bin/systemctl", "restart", "libvirtd.service")
    #: At most this many restarts within ``restart_window`` seconds (0: never restart);
    #: past it the node is reported unhealthy.
    restart_max: int = 3
    restart_window: float = 3600.0
    #: How long one restart may take: the command, then libvirtd answering again.
    restart_wait: float = 60.0
    #: Restart libvirtd before a job starts when its resident memory passes this many MiB
    #: (0: never). Its PID comes from ``pid_file``.
    max_rss_mib: int = 0
    pid_file: Path = Path("/run/libvirtd.pid")


@dataclass(frozen=True, slots=True)
class VmConfig:
    """Defaults for every job's VM."""

    accel: Accel = "auto"
    accel_probe_timeout: float = 10.0
    machine: str = "q35"
    tcg_cpu_model: str = "max"
    memory: int = 1024
    vcpus: int = 1
    boot_timeout: float = 180.0
    outbound_network: bool = True
    #: TCG's translation-block cache per VM in MiB (0: QEMU's own default, 1 GiB); part of
    #: QEMU's memory overhead (:class:`LimitsConfig`). Ignored under KVM.
    tcg_tb_cache_mib: int = 128


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Holding each job's VM to its allocation (docs/admin-guide.md "Resource limits")."""

    #: Pin the VM's vCPU and QEMU threads to the host CPUs the scheduler allocated to the
    #: job (Slurm's CPU_IDs, Torque's cpuset); unpinned where the scheduler names none.
    pin_cpus: bool = True
    #: A hard limit on the VM's QEMU (libvirt's memory cgroup): the job's memory allocation;
    #: the guest gets the allocation less QEMU's overhead.
    memory_limit: bool = True
    #: QEMU's own memory beyond the guest's RAM, measured (docs/design.md, "QEMU's
    #: memory"): fixed MiB per VM plus MiB per GiB of guest RAM; under TCG plus the
    #: translation-block cache ([vm].tcg_tb_cache_mib) and its bookkeeping.
    qemu_overhead_mib: int = 128
    qemu_overhead_per_gib: int = 4


@dataclass(frozen=True, slots=True)
class PathsConfig:
    """Where vmbatch keeps per-job and cached files (world-traversable: QEMU runs unprivileged)."""

    job_dir: Path = Path("/var/lib/vmbatch/jobs")
    cache_dir: Path = Path("/var/cache/vmbatch")
    console_log_dir: Path | None = None


def first_present(*candidates: str) -> Callable[[], Path]:
    """A default path: the first of ``candidates`` that exists on this host, else the first
    (whose absence ``vmbatch doctor`` then reports). Distributions put programs in
    different places: EL9's QEMU is ``/usr/libexec/qemu-kvm`` (qemu-kvm-core), Debian's
    and Ubuntu's ``/usr/bin/qemu-system-x86_64``; Slurm and Torque built from source live
    in ``/usr/local/bin``."""

    def pick() -> Path:
        for c in candidates:
            if Path(c).exists():
                return Path(c)
        return Path(candidates[0])

    return pick


@dataclass(frozen=True, slots=True)
class ToolsConfig:
    """External programs, by absolute path (hooks run without PATH). Defaults are found
    per distribution (:func:`first_present`) unless configured."""

    qemu_img: Path = field(default_factory=first_present("/usr/bin/qemu-img"))
    qemu_system: Path = field(
        default_factory=first_present(
            "/usr/bin/qemu-system-x86_64", "/usr/libexec/qemu-kvm", "/usr/bin/qemu-kvm"
        )
    )
    #: libguestfs's shell, for images with ``context = "inject"`` (libguestfs-tools).
    guestfish: Path = Path("/usr/bin/guestfish")
    command_timeout: float = 60.0
    #: Scheduler clients the hooks call (Slurm: job details, draining the node; Torque:
    #: taking the node offline). Hooks run without PATH, so absolute paths.
    scontrol: Path = field(
        default_factory=first_present("/usr/bin/scontrol", "/usr/local/bin/scontrol")
    )
    squeue: Path = field(default_factory=first_present("/usr/bin/squeue", "/usr/local/bin/squeue"))
    pbsnodes: Path = field(
        default_factory=first_present("/usr/bin/pbsnodes", "/usr/local/bin/pbsnodes")
    )


@dataclass(frozen=True, slots=True)
class SshConfig:
    """How vmbatch logs in to the guest."""

    user: str = "root"
    port: int = 22
    connect_timeout: float = 10.0
    keepalive_interval: int = 15
    #: After the connection to a running job's guest drops, keep trying to log in again
    #: for this long without an answer from the guest (the job goes on in it meanwhile).
    reconnect_timeout: float = 600.0
    #: While a job prints nothing for this long, check that the guest still answers (run
    #: ``true`` within ``connect_timeout``); a hung guest then counts as a dropped connection.
    liveness_interval: float = 30.0


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The image cache: remote and file:// sources are fetched into ``[paths].cache_dir``."""

    #: Evict least-recently-used images beyond this many GiB (0: no cap).
    max_size_gib: float = 50.0
    #: A download whose partial file has not grown for this long is taken over.
    stall_timeout: float = 300.0
    #: Refuse images whose virtual disk size exceeds this (GiB).
    max_virtual_size_gib: float = 500.0
    #: ``file://`` sources must lie below one of these directories.
    image_dirs: tuple[Path, ...] = (Path("/var/lib/vmbatch/images"),)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class DisksConfig:
    """Per-job extra disks and the host's free-space guard."""

    #: No job starts (it is requeued) while ``job_dir`` or ``cache_dir`` has less free space.
    reserve_gib: float = 5.0
    #: Size of the empty CernVM-FS cache disk per job (GiB; 0: none). Images may override.
    cvmfs_cache_gib: float = 0.0
    #: Size of the empty scratch disk per job (GiB; 0: none). Images may override.
    scratch_gib: float = 0.0
    #: Host space one job's disks (overlay, CernVM-FS cache, scratch) may take together
    #: (GiB; 0: no limit). Watched while the job runs; a job over it is ended.
    job_max_gib: float = 100.0


@dataclass(frozen=True, slots=True)
class ContextConfig:
    """Site additions to every guest's contextualization."""

    #: A YAML file of cloud-config keys merged into every NoCloud user-data (packages,
    #: runcmd, write_files, timezone, ...). Keys that touch accounts, keys, passwords or
    #: the hostname are refused: vmbatch owns those.
    site_user_data: Path | None = None
    #: For images with ``context = "cernvm"``: CernVM-FS repositories to mount
    #: (amiconfig ``[cernvm] repositories``), the CernVM-FS proxy in CernVM-FS notation
    #: (``[cernvm] proxy`` and µCernVM ``cvmfs_http_proxy``; e.g. ``http://squid:3128;DIRECT``)
    #: and the experiment organisations (``[cernvm] organisations``).
    cvmfs_repositories: tuple[str, ...] = ()
    cvmfs_http_proxy: str = ""
    cernvm_organisations: tuple[str, ...] = ()
    #: For ``context = "inject"``: how long the libguestfs appliance may take to start
    #: (and to flush at the end); ~17 s under TCG, a few seconds with KVM.
    inject_timeout: float = 300.0
    #: Group names never given to the job's user in the guest, on top of the built-in list
    #: (:data:`vmbatch.contextualize.groups.PRIVILEGED`: sudo, wheel, adm, docker, disk, ...).
    privileged_groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class JobConfig:
    """How jobs run inside their guests."""

    #: Seconds between a terminating signal forwarded to the job (SIGTERM, SIGINT, SIGHUP)
    #: and SIGKILL to its process group, and between the walltime's SIGTERM and SIGKILL.
    kill_grace: float = 30.0
    #: Names removed from the job's environment on top of the built-in list (host-only
    #: variables such as SSH_AUTH_SOCK, DISPLAY, XDG_RUNTIME_DIR, TMPDIR, KRB5CCNAME).
    env_deny: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """The batch-system hooks (prologue, job starter, epilogue); see docs/admin-*.md."""

    #: The image of a job that names none ("": every job must name one).
    default_image: str = ""
    #: Further catalog images a job may choose with ``#VMBATCH image=NAME``.
    user_images: tuple[str, ...] = ()
    #: Upper bounds for one VM (0: the node's cores / memory less ``reserve_memory``).
    max_vcpus: int = 0
    max_memory: int = 0
    #: MiB of the node's memory kept for the host itself (system, daemons); QEMU's own
    #: overhead is counted per VM (:class:`LimitsConfig`).
    reserve_memory: int = 1024
    #: Root-only directory of per-job state records (what each prologue created).
    state_dir: Path = Path("/var/lib/vmbatch/state")
    #: Parent of the per-job directories owned by the job's user (mode 0700 each): the
    #: job's SSH key, the guest's host key and port, or the prologue's error message.
    user_dir: Path = Path("/run/vmbatch")
    #: One JSON line per job (:mod:`vmbatch.hooks.accounting`; ``vmbatch report`` reads it).
    accounting_log: Path = Path("/var/log/vmbatch/accounting.jsonl")
    #: Torque's ``epilogue.precancel`` (``qdel`` waits for it) stops trying to reach the
    #: job's VM after this many seconds (plus the wait and attempt under way).
    precancel_timeout: float = 30.0
    # -- failure policy (docs/admin-guide.md "Failure policy") ---------------------------
    #: A job whose image failed (no boot, guest died while booting, wrong host key, bad
    #: image file): ``fail`` it, or ``requeue`` it like a transient failure.
    image_failure: ImageFailure = "fail"
    #: After this many image failures on this node within ``image_failure_window`` seconds,
    #: the image is refused on this node for ``image_cooloff`` seconds (0: never refused).
    image_failures: int = 3
    image_failure_window: float = 3600.0
    image_cooloff: float = 1800.0
    #: Slurm: the job starter exits with ``requeue_exit`` to have the job requeued without
    #: draining the node (slurm.conf ``RequeueExit`` must list it), with ``hold_exit`` to
    #: have it requeued and held (``RequeueExitHold``; 0: fail the job instead).
    requeue_exit: int = 199
    hold_exit: int = 200
    #: A job vmbatch asked to requeue this many times (``SLURM_JOB_RESTART_COUNT``) is held
    #: (or failed) instead, with the reason in its output: never a loop.
    max_requeues: int = 3
    #: The reaper (``vmbatch cleanup --stale``) leaves alone every job whose prologue
    #: started less than this many seconds ago (whatever the scheduler says), and every
    #: file with no owner that changed more recently.
    reap_grace: float = 600.0
    #: pbs_mom's job files (``<PBS_HOME>/mom_priv/jobs``): a Torque job runs on this node
    #: while its ``<id>.JB`` is there (the reaper's test; Slurm's is ``squeue``).
    torque_jobs_dir: Path = Path("/var/spool/torque/mom_priv/jobs")
    # -- keep on failure (docs/admin-guide.md "Keeping a failed job's VM") ---------------
    #: What the epilogue does with the VM of a job that failed (non-zero exit status):
    #: ``no`` tears it down, ``paused`` keeps it paused (its memory stays in use),
    #: ``disks`` destroys it but keeps its job directory (disks, console log).
    keep_failed: KeepFailed = "no"
    #: A kept VM is removed (by the reaper) this many seconds after its job ended.
    keep_failed_for: float = 3600.0
    #: At most this many jobs are kept on the node at once; further failures are torn down.
    keep_failed_max: int = 1
    #: Jobs may ask with ``#VMBATCH keep=yes`` to be kept if they fail (as ``keep_failed``
    #: says, or paused where it is ``no``), and with ``keep=no`` not to be.
    user_keep: bool = False


@dataclass(frozen=True, slots=True)
class CheckpointConfig:
    """Checkpoints of a batch job's VM on disk (:mod:`vmbatch.checkpoint`;
    docs/admin-guide.md "Checkpoints")."""

    #: Root-only directory (0700) of the checkpoints, one subdirectory per job. Shared
    #: between nodes (same path everywhere) if a requeued job may restore on another node.
    dir: Path = Path("/var/lib/vmbatch/checkpoints")
    #: What the prologue does when a job's newest checkpoint does not verify (a file's
    #: checksum differs, the base image or the vmbatch/QEMU version changed): ``fresh``
    #: boots the job afresh (the reason is logged), ``hold`` fails the job's run and has
    #: the scheduler hold it ([batch].hold_exit) with the reason in its output.
    on_bad: OnBadCheckpoint = "fresh"
    #: Seconds libvirt may take to save or restore a VM's memory (a 1 GiB guest takes
    #: seconds; a slow disk or a large guest more).
    timeout: float = 600.0
    #: What SIGUSR2 to a job's starter does (``scancel -b -s USR2``,
    #: ``sbatch --signal=B:USR2@T``, ``qsig -s USR2``): ``checkpoint`` has the node agent
    #: checkpoint the job's VM, which then runs on, and forwards the signal to the job
    #: after it; ``forward`` only forwards it.
    usr2: Usr2Action = "checkpoint"


@dataclass(frozen=True, slots=True)
class SlurmConfig:
    """Which Slurm jobs are vmbatch's (docs/admin-slurm.md, "Scope, and living beside a
    site's own Prolog and job_submit"). The scope itself is decided on the controller
    (``conf/slurm/vmbatch.lua``); the nodes follow the mark it leaves on each job."""

    #: The OCI bundle ``job_submit.lua`` gives every job that runs in a VM (``M.bundle``
    #: in ``vmbatch.lua``; also the ``--container`` of such a job's ``srun`` steps). The
    #: Prolog and Epilog act only on jobs whose container is this path (as ``squeue``
    #: reports it) and leave every other job alone: no VM, no state, exit 0.
    bundle: Path = Path("/etc/vmbatch/slurm-bundle")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus metrics (docs/admin-guide.md, "Metrics"): a text file for node_exporter's
    textfile collector, rewritten atomically after each job and by the reaper."""

    #: The file (its name must end in ``.prom``, the collector's glob); "" = no metrics
    #: file. The default is the directory Debian's ``prometheus-node-exporter`` reads
    #: (its ``--collector.textfile.directory`` default); while that directory does not
    #: exist nothing is written (counters are still kept, in ``[batch].state_dir``).
    textfile: str = "/var/lib/prometheus/node-exporter/vmbatch.prom"


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """``vmbatch check`` (docs/admin-guide.md, "Health checks")."""

    #: The most seconds ``vmbatch check`` takes: checks still running then count as
    #: CRITICAL (Slurm kills a HealthCheckProgram after 60 s; NHC's own timeout is 30 s).
    timeout: float = 20.0
    #: How long libvirtd may take to answer the check's call (instead of [libvirt].timeout).
    libvirt_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class DebugConfig:
    """Fault injection for crash-consistency tests and soaks (:mod:`vmbatch.faults`).

    Only root's configuration may arm points: :func:`load` refuses ``fault_points`` in a
    file that is not root's alone, whoever loads it.
    """

    #: Named steps (``faults.registry()``) at which a vmbatch process kills itself.
    fault_points: tuple[str, ...] = ()
    #: What an armed point does: ``kill`` sends the process SIGKILL.
    fault_action: Literal["kill"] = "kill"


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Where the hooks' and commands' log lines go (:mod:`vmbatch.logsetup`;
    docs/admin-guide.md, "Logs")."""

    #: ``journald`` (native protocol: ``journalctl VMBATCH_JOB_ID=42``; where no journal
    #: listens, syslog), ``syslog`` (``/dev/log``) or ``stderr`` (the scheduler's files).
    target: LogTarget = "journald"
    #: The least severe lines logged; ``debug`` for tracing a problem.
    level: LogLevel = "info"
    facility: LogFacility = "daemon"
    syslog_socket: Path = Path("/dev/log")
    journal_socket: Path = Path("/run/systemd/journal/socket")


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """One catalog entry.

    ``source``: an absolute path (used in place), ``file:///abs/path`` (copied into the cache,
    only below ``[cache].image_dirs``), or an ``http(s)://`` URL (downloaded into the cache).
    Remote and file:// sources need ``sha256``, ``sha512`` or ``checksum_url`` (the checksum
    file a distribution publishes beside its images, :mod:`vmbatch.images.checksums`) unless
    ``verify = false``. Without ``kernel`` the image boots from its own disk through its own
    bootloader (firmware boot).
    """

    name: str
    source: str
    sha256: str | None = None
    sha512: str | None = None
    #: URL (http(s):// or file:///) of a checksum file listing the source's file name.
    checksum_url: str | None = None
    verify: bool = True
    format: ImageFormat | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    firmware: Path | None = None
    memory: int | None = None
    vcpus: int | None = None
    cvmfs_cache_gib: float | None = None
    scratch_gib: float | None = None
    #: Seconds after which a cached copy of an unverified http(s) image is revalidated with
    #: a conditional request (0: never).
    refresh_interval: float = 0.0
    #: How the job's identity gets into the guest: ``nocloud`` (cloud-init), ``cernvm``
    #: (CernVM/HEPiX context CD-ROM) or ``inject`` (written into the overlay before boot).
    context: ContextName = "nocloud"
    #: One line for users (``vmbatch images``): what the image is, e.g. "AlmaLinux 9, ROOT 6".
    description: str = ""


@dataclass(frozen=True, slots=True)
class MountConfig:
    """One shared filesystem mounted in every job's guest (``[mounts.NAME]``).

    ``source``: ``nfs://server[:port]/export/path`` (NFSv4 over TCP; ``port`` defaults to
    2049). The guest reaches the server through QEMU's user-mode NAT, so connections come
    from the node's address and an unprivileged port (knfsd exports need ``insecure``); a
    server on the node's loopback (127.0.0.1) is reached at the user-mode gateway.
    ``path``: where it is mounted in the guest, the same path as on the node, so the job's
    working directory and relative paths work unchanged.
    """

    name: str
    source: str
    path: Path
    #: Extra mount options, comma-separated (e.g. ``vers=4.2,hard,nosuid``); vmbatch adds
    #: ``retry=0`` (it decides the retries itself) and ``port=`` from the URL.
    options: str = ""
    #: Total seconds to keep trying before the job start fails (requeued: a node problem).
    timeout: float = 120.0
    #: Seconds one ``mount`` attempt may take (a server that accepts but never answers).
    attempt_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration."""

    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    vm: VmConfig = field(default_factory=VmConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    ssh: SshConfig = field(default_factory=SshConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    disks: DisksConfig = field(default_factory=DisksConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    job: JobConfig = field(default_factory=JobConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    log: LogConfig = field(default_factory=LogConfig)
    images: Mapping[str, ImageConfig] = field(default_factory=dict)
    mounts: Mapping[str, MountConfig] = field(default_factory=dict)
    files: tuple[Path, ...] = ()


_SECTIONS: dict[str, type[Any]] = {
    "libvirt": LibvirtConfig,
    "vm": VmConfig,
    "limits": LimitsConfig,
    "paths": PathsConfig,
    "tools": ToolsConfig,
    "ssh": SshConfig,
    "cache": CacheConfig,
    "disks": DisksConfig,
    "context": ContextConfig,
    "job": JobConfig,
    "batch": BatchConfig,
    "checkpoint": CheckpointConfig,
    "slurm": SlurmConfig,
    "metrics": MetricsConfig,
    "health": HealthConfig,
    "debug": DebugConfig,
    "log": LogConfig,
}


def config_files(path: Path | None = None, *, honour_env: bool = True) -> list[Path]:
    """The files that make up the configuration, in the order they are applied."""
    named = os.environ.get(ENV_VAR) if honour_env else None
    main = path or Path(named or DEFAULT_PATH)
    dropin_dir = main.with_name(main.stem + ".d")
    files = [main]
    if dropin_dir.is_dir():
        files += sorted(p for p in dropin_dir.iterdir() if p.suffix == ".toml" and p.is_file())
    return files


def load(path: Path | None = None, *, honour_env: bool = True, as_root: bool = False) -> Config:
    """Read, merge and validate the configuration; raise one ConfigError listing all problems.

    A missing default ``/etc/vmbatch/vmbatch.toml`` means "all defaults"; a missing file that
    was asked for explicitly (argument or ``VMBATCH_CONFIG``) is an error.

    ``honour_env=False`` ignores ``VMBATCH_CONFIG`` (the privileged job starter: its
    environment is the job's). ``as_root`` (root-run hooks and commands) also requires every
    file read and every path of :func:`root_paths` to be under root's sole control
    (:mod:`vmbatch.trust`): whoever names the file, root reads only what root wrote.
    ``[debug].fault_points`` (:mod:`vmbatch.faults`) is refused unless every file read is
    root's alone, also without ``as_root``: only root arms fault injection.
    """
    explicit = path is not None or (honour_env and bool(os.environ.get(ENV_VAR)))
    files = config_files(path, honour_env=honour_env)
    problems: list[str] = []
    if as_root:
        problems += _untrusted([files[0].with_name(files[0].stem + ".d")])
    merged: dict[str, Any] = {}
    read: list[Path] = []
    for i, f in enumerate(files):
        try:
            with f.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            if i == 0 and not explicit:
                continue
            problems.append(f"{f}: file not found")
            continue
        except PermissionError:
            problems.append(f"{f}: not readable (run as root or fix the file's permissions)")
            continue
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"{f}: not valid TOML: {exc}")
            continue
        if as_root and (problem := _untrusted([f])):
            problems += problem
            continue
        read.append(f)
        _merge(merged, data)
    cfg = _build(merged, problems, tuple(read))
    if cfg is not None and as_root:
        problems += _untrusted(root_paths(cfg))
    if cfg is not None and cfg.debug.fault_points and not as_root:
        # Whoever loads it (the job starter runs as the job's user): only root arms faults.
        problems += [
            f"[debug].fault_points: only root's configuration may arm fault points, and {why}"
            for f in read
            if (why := trust.untrusted_reason(f)) is not None
        ]
    if problems or cfg is None:
        raise ConfigError(problems, source=str(files[0]))
    return cfg


def root_paths(cfg: Config) -> list[Path]:
    """What root runs, reads or writes in on every job: each must be root's alone.

    Directories the hooks create files in; the programs they run (libvirtd's restart command
    too); the site's user-data, the cache's source directories and libvirtd's PID file
    (whose process root inspects, and restarts libvirtd for). Images, kernels and firmware
    are checked when a job uses one (:func:`vmbatch.images.catalog.resolve`): one badly
    placed image fails its own jobs, not the node.
    """
    tools = (getattr(cfg.tools, f.name) for f in dataclasses.fields(cfg.tools))
    return [
        cfg.batch.state_dir,
        cfg.batch.user_dir,
        cfg.batch.accounting_log.parent,
        cfg.paths.job_dir,
        cfg.paths.cache_dir,
        cfg.checkpoint.dir,
        *([cfg.paths.console_log_dir] if cfg.paths.console_log_dir else []),
        *(tool for tool in tools if isinstance(tool, Path)),
        *([cfg.context.site_user_data] if cfg.context.site_user_data else []),
        *cfg.cache.image_dirs,
        *([Path(cfg.libvirt.restart_command[0])] if cfg.libvirt.restart_command else []),
        cfg.libvirt.pid_file,
        # Root's log lines go to these sockets: no one else may put a socket there.
        cfg.log.syslog_socket.parent,
        cfg.log.journal_socket.parent,
    ]


def _untrusted(paths: list[Path]) -> list[str]:
    return [
        f"{reason}: root will not use it ({trust.fix_hint(p)})"
        for p in paths
        if (reason := trust.untrusted_reason(p)) is not None
    ]


def parse(data: Mapping[str, Any]) -> Config:
    """Validate an already-parsed TOML mapping (used by tests and ``config check``)."""
    problems: list[str] = []
    cfg = _build(dict(data), problems, ())
    if problems or cfg is None:
        raise ConfigError(problems)
    return cfg


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _build(data: dict[str, Any], problems: list[str], files: tuple[Path, ...]) -> Config | None:
    known = [*_SECTIONS, "images", "mounts"]
    for key in data:
        if key not in known:
            problems.append(_unknown(key, known, "section"))
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            problems.append(f"[{name}] must be a table")
            raw = {}
        sections[name] = _make(cls, raw, f"[{name}]", problems, rules=_RULES.get(name, ()))
    images: dict[str, ImageConfig] = {}
    raw_images = data.get("images", {})
    if not isinstance(raw_images, dict):
        problems.append("[images] must be a table of [images.NAME] tables")
        raw_images = {}
    for name, raw in raw_images.items():
        where = f"[images.{name}]"
        if not _IMAGE_NAME.match(name):
            problems.append(
                f"{where}: invalid image name (use letters, digits, '.', '_', '-'; max 64)"
            )
        if not isinstance(raw, dict):
            problems.append(f"{where} must be a table")
            continue
        img = _make(ImageConfig, {"name": name, **raw}, where, problems, rules=_RULES["image"])
        _check_image(raw, where, problems)
        if img is not None:
            images[name] = img
    mounts = _build_mounts(data.get("mounts", {}), problems)
    vm = sections["vm"]
    if mounts and vm is not None and not vm.outbound_network:
        problems.append(
            "[mounts] need [vm].outbound_network = true: guests reach NFS servers through"
            " QEMU's user-mode NAT (set it, or remove the [mounts.*] tables)"
        )
    debug = sections["debug"]
    if debug is not None and debug.fault_points:
        from vmbatch import faults  # imports this module: only needed when armed

        problems += faults.problems(debug.fault_points)
    batch = sections["batch"]
    if batch is not None and batch.requeue_exit == batch.hold_exit:
        problems.append(
            f"[batch].requeue_exit and hold_exit are both {batch.hold_exit}: give them"
            " different exit statuses (slurm.conf RequeueExit and RequeueExitHold)"
        )
    if batch is not None:
        for key, names in (
            ("default_image", [batch.default_image]),
            ("user_images", batch.user_images),
        ):
            for name in names:
                if name and name not in images:
                    problems.append(
                        f"[batch].{key}: {name!r} is not a catalog image (add [images.{name}]"
                        " or remove it)"
                    )
    if any(v is None for v in sections.values()):
        return None
    return Config(
        images=types.MappingProxyType(images),
        mounts=types.MappingProxyType(mounts),
        files=files,
        **sections,
    )


#: ``nfs://host[:port]/export``: a DNS name or IPv4 address (no IPv6 literal yet).
NFS_URL = re.compile(
    r"nfs://(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))(?::(?P<port>[0-9]{1,5}))?"
    r"(?P<export>/[A-Za-z0-9._+@%=/-]*)"
)
_MOUNT_OPTION = re.compile(r"[A-Za-z0-9_-]+(=[A-Za-z0-9_.:/+-]+)?")
#: Mount options vmbatch sets itself (it owns the retries and the server's address/port).
_OWN_OPTIONS = frozenset({"retry", "port", "addr", "clientaddr", "bg", "fg"})


def _check_mount(raw: Mapping[str, Any], where: str, problems: list[str]) -> None:
    """The URL, the guest path and the options (types were checked by ``_make``)."""
    source, path, options = raw.get("source"), raw.get("path"), raw.get("options", "")
    if isinstance(source, str):
        url = NFS_URL.fullmatch(source)
        if url is None:
            problems.append(
                f"{where}.source: must be nfs://server[:port]/export (a host name or IPv4"
                f" address, an absolute export path), got {source!r}"
            )
        elif url["port"] and not 0 < int(url["port"]) < 65536:
            problems.append(f"{where}.source: port must be 1-65535, got {url['port']}")
    if isinstance(path, str) and path.startswith("/"):
        plain = re.fullmatch(r"/[A-Za-z0-9._+@%=/-]*", path)
        if ".." in Path(path).parts or Path(path) == Path("/") or not plain:
            problems.append(
                f"{where}.path: must be an absolute path other than / (letters, digits and"
                f" ._+@%=-, no '..'), got {path!r}"
            )
    for opt in filter(None, options.split(",") if isinstance(options, str) else ()):
        if not _MOUNT_OPTION.fullmatch(opt):
            problems.append(f"{where}.options: {opt!r} is not a mount option (key[=value])")
        elif opt.split("=")[0] in _OWN_OPTIONS:
            problems.append(
                f"{where}.options: vmbatch sets {opt.split('=')[0]!r} itself (retries"
                " are [mounts.NAME] timeout and attempt_timeout; the port goes in the URL)"
            )


def _build_mounts(raw_mounts: Any, problems: list[str]) -> dict[str, MountConfig]:
    if not isinstance(raw_mounts, dict):
        problems.append("[mounts] must be a table of [mounts.NAME] tables")
        return {}
    mounts: dict[str, MountConfig] = {}
    for name, raw in raw_mounts.items():
        where = f"[mounts.{name}]"
        if not _IMAGE_NAME.match(name):
            problems.append(f"{where}: invalid name (use letters, digits, '.', '_', '-'; max 64)")
        if not isinstance(raw, dict):
            problems.append(f"{where} must be a table")
            continue
        before = len(problems)
        mount = _make(MountConfig, {"name": name, **raw}, where, problems, rules=_RULES["mount"])
        _check_mount(raw, where, problems)
        if mount is not None and len(problems) == before:
            mounts[name] = mount
    paths = [m.path for m in mounts.values()]
    for p in sorted({p for p in paths if paths.count(p) > 1}):
        problems.append(f"[mounts]: more than one mount at {p}")
    return mounts


def _unknown(key: str, known: list[str], what: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(known)
    return f"unknown {what} {key!r} ({hint})"


def _make(
    cls: type[Any],
    raw: Mapping[str, Any],
    where: str,
    problems: list[str],
    rules: tuple[tuple[str, Callable[[Any], bool], str], ...] = (),
) -> Any:
    """Build dataclass ``cls`` from ``raw``: convert and type-check every field, then apply
    the range ``rules`` to every value that converted (so all problems show at once)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    before = len(problems)
    for key in raw:
        if key not in fields:
            problems.append(f"{where}: " + _unknown(key, list(fields), "key"))
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{where}: missing required key {name!r}")
            continue
        ok, value = _convert(raw[name], hints[name])
        if not ok:
            problems.append(f"{where}.{name}: expected {_describe(hints[name])}, got {raw[name]!r}")
        else:
            values[name] = value
            paths = value if isinstance(value, tuple) else (value,)
            for p in paths:
                if isinstance(p, Path) and not p.is_absolute():
                    problems.append(f"{where}.{name}: must be an absolute path, got {str(p)!r}")
    for key, check, msg in rules:
        if key in values and not check(values[key]):
            problems.append(f"{where}.{key}: {msg}, got {values[key]!r}")
    if len(problems) != before:
        return None
    return cls(**values)


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, list):
            return False, None
        items = [_convert(v, item) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            ok, conv = _convert(value, arg)
            if ok:
                return True, conv
        return False, None
    if origin is Literal:
        return (value in typing.get_args(hint)), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if hint is str:
        return isinstance(value, str), value
    if hint is Path:
        if isinstance(value, str) and value:
            return True, Path(value)
        return False, None
    raise TypeError(f"unsupported config type {hint!r}")  # a bug in this module, not input


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(hint) if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is tuple:
        return (
            "a list of "
            + _describe(typing.get_args(hint)[0]).removeprefix("an ").removeprefix("a ")
            + "s"
        )
    names = {
        bool: "true/false",
        int: "an integer",
        float: "a number",
        str: "a string",
        Path: "an absolute path",
    }
    return names.get(hint, str(hint))


_HEX = {"sha256": 64, "sha512": 128}


def _check_image(raw: Mapping[str, Any], where: str, problems: list[str]) -> None:
    source = raw.get("source")
    remote = isinstance(source, str) and source.startswith(("http://", "https://"))
    local_url = isinstance(source, str) and source.startswith("file://")
    if isinstance(source, str) and not (remote or local_url or source.startswith("/")):
        problems.append(
            f"{where}.source: must be an absolute path, file:///path or http(s):// URL,"
            f" got {source!r}"
        )
    if local_url and not str(source)[len("file://") :].startswith("/"):
        problems.append(f"{where}.source: file:// URLs need an absolute path (file:///...)")
    for algo, length in _HEX.items():
        value = raw.get(algo)
        if isinstance(value, str) and not re.fullmatch(rf"[0-9a-fA-F]{{{length}}}", value):
            problems.append(f"{where}.{algo}: must be {length} hex digits")
    given = [key for key in ("sha256", "sha512", "checksum_url") if key in raw]
    if len(given) > 1:
        problems.append(
            f"{where}: give only one of sha256, sha512, checksum_url (not {' and '.join(given)})"
        )
    has_sum = "sha256" in raw or "sha512" in raw
    sums_url = raw.get("checksum_url")
    if isinstance(sums_url, str):
        problems += _check_checksum_url(raw, where, sums_url, remote or local_url)
    elif (remote or local_url) and not has_sum and raw.get("verify", True) is not False:
        problems.append(
            f"{where}: a downloaded image needs sha256, sha512 or checksum_url (or verify ="
            " false to accept it unchecked, at your own risk)"
        )
    if raw.get("refresh_interval", 0) and (has_sum or not remote):
        problems.append(
            f"{where}.refresh_interval: only http(s) images without a fixed checksum can"
            " change (a checksum pins the content); drop refresh_interval, or replace the"
            " checksum by checksum_url (or verify = false)"
        )
    if "initrd" in raw and "kernel" not in raw:
        problems.append(f"{where}: initrd given without kernel (set kernel too, or drop initrd)")
    if raw.get("cmdline") and "kernel" not in raw:
        problems.append(f"{where}: cmdline given without kernel (set kernel too, or drop it)")


def _check_checksum_url(raw: Mapping[str, Any], where: str, url: str, fetched: bool) -> list[str]:
    """Problems of an image's ``checksum_url`` (the image's file name is looked up in it)."""
    problems = []
    if not url.startswith(("http://", "https://", "file:///")):
        problems.append(f"{where}.checksum_url: must be an http(s):// or file:/// URL, got {url!r}")
    if not fetched:
        problems.append(
            f"{where}.checksum_url: the source is an absolute path, used in place and never"
            " verified; give it as file:///path to have it copied into the cache and verified,"
            " or drop checksum_url"
        )
    if raw.get("verify", True) is False:
        problems.append(f"{where}: checksum_url with verify = false; drop one of the two")
    source = raw.get("source")
    if isinstance(source, str) and not urlsplit(source).path.rpartition("/")[2]:
        problems.append(
            f"{where}.source: names no file to look up in the checksum file; point it at the"
            " image file itself"
        )
    return problems


_Rule = tuple[str, Callable[[Any], bool], str]
_RULES: dict[str, tuple[_Rule, ...]] = {
    "libvirt": (
        ("timeout", lambda v: v > 0, "must be > 0 seconds"),
        ("keepalive_interval", lambda v: v >= 0, "must be >= 0"),
        ("keepalive_count", lambda v: v >= 0, "must be >= 0"),
        ("teardown_timeout", lambda v: v >= 0, "must be >= 0 seconds"),
        (
            "restart_command",
            lambda v: not v or (v[0].startswith("/") and all(v)),
            "must be [] (never restart) or a command whose first item is an absolute path"
            " and no item empty",
        ),
        ("restart_max", lambda v: v >= 0, "must be >= 0 (0: never restart)"),
        ("restart_window", lambda v: v > 0, "must be > 0 seconds"),
        ("restart_wait", lambda v: v > 0, "must be > 0 seconds"),
        ("max_rss_mib", lambda v: v >= 0, "must be >= 0 (MiB; 0: no ceiling)"),
    ),
    "vm": (
        ("memory", lambda v: v >= 64, "must be at least 64 (MiB)"),
        ("vcpus", lambda v: v >= 1, "must be at least 1"),
        ("boot_timeout", lambda v: v > 0, "must be > 0 seconds"),
        ("accel_probe_timeout", lambda v: v > 0, "must be > 0 seconds"),
        (
            "tcg_tb_cache_mib",
            lambda v: v >= 0,
            "must be >= 0 (MiB; 0: QEMU's default of 1 GiB)",
        ),
    ),
    "limits": (
        ("qemu_overhead_mib", lambda v: v >= 0, "must be >= 0 (MiB)"),
        ("qemu_overhead_per_gib", lambda v: v >= 0, "must be >= 0 (MiB per GiB)"),
    ),
    "tools": (("command_timeout", lambda v: v > 0, "must be > 0 seconds"),),
    "job": (("kill_grace", lambda v: v >= 0, "must be >= 0 seconds"),),
    "batch": (
        ("max_vcpus", lambda v: v >= 0, "must be >= 0 (0: the node's cores)"),
        ("max_memory", lambda v: v == 0 or v >= 64, "must be 0 (no cap) or at least 64 (MiB)"),
        ("reserve_memory", lambda v: v >= 0, "must be >= 0 (MiB)"),
        ("precancel_timeout", lambda v: v >= 0, "must be >= 0 seconds (0: one attempt)"),
        ("image_failures", lambda v: v >= 0, "must be >= 0 (0: never refuse an image)"),
        ("image_failure_window", lambda v: v > 0, "must be > 0 seconds"),
        ("image_cooloff", lambda v: v >= 0, "must be >= 0 seconds"),
        ("requeue_exit", lambda v: 1 <= v <= 255, "must be an exit status 1-255"),
        ("hold_exit", lambda v: 0 <= v <= 255, "must be an exit status 1-255 (0: fail instead)"),
        ("max_requeues", lambda v: v >= 0, "must be >= 0 (0: never requeue)"),
        ("reap_grace", lambda v: v >= 0, "must be >= 0 seconds"),
        ("keep_failed_for", lambda v: v > 0, "must be > 0 seconds"),
        ("keep_failed_max", lambda v: v >= 0, "must be >= 0 (0: keep none)"),
    ),
    "checkpoint": (("timeout", lambda v: v > 0, "must be > 0 seconds"),),
    "ssh": (
        ("reconnect_timeout", lambda v: v >= 0, "must be >= 0 seconds (0: no reconnect)"),
        ("liveness_interval", lambda v: v >= 0, "must be >= 0 seconds (0: no checks)"),
        ("port", lambda v: 0 < v < 65536, "must be a TCP port (1-65535)"),
        ("connect_timeout", lambda v: v > 0, "must be > 0 seconds"),
    ),
    "cache": (
        ("max_size_gib", lambda v: v >= 0, "must be >= 0 (0: no cap)"),
        ("stall_timeout", lambda v: v > 0, "must be > 0 seconds"),
        ("max_virtual_size_gib", lambda v: v > 0, "must be > 0"),
        ("connect_timeout", lambda v: v > 0, "must be > 0 seconds"),
        ("read_timeout", lambda v: v > 0, "must be > 0 seconds"),
    ),
    "disks": (
        ("reserve_gib", lambda v: v >= 0, "must be >= 0"),
        ("cvmfs_cache_gib", lambda v: v >= 0, "must be >= 0 (0: no disk)"),
        ("scratch_gib", lambda v: v >= 0, "must be >= 0 (0: no disk)"),
        ("job_max_gib", lambda v: v >= 0, "must be >= 0 (0: no limit)"),
    ),
    "context": (
        ("inject_timeout", lambda v: v > 0, "must be > 0 seconds"),
        (
            "cvmfs_repositories",
            lambda v: all(_REPO.fullmatch(r) for r in v),
            "each must be a repository name such as atlas.cern.ch (letters, digits, '.', '_', '-')",
        ),
        (
            "cvmfs_http_proxy",
            lambda v: _PROXY.fullmatch(v) is not None,
            "must be CernVM-FS proxy notation (URLs or DIRECT joined by ';' and '|', no"
            " spaces or quotes)",
        ),
        (
            "cernvm_organisations",
            lambda v: all(_REPO.fullmatch(o) for o in v),
            "each must be a plain name (letters, digits, '.', '_', '-')",
        ),
        (
            "privileged_groups",
            lambda v: all(_GROUP.fullmatch(g) for g in v),
            "each must be a group name (a letter or '_', then letters, digits, '.', '_', '-';"
            " at most 32)",
        ),
    ),
    "metrics": (
        (
            "textfile",
            lambda v: v == "" or (v.startswith("/") and v.endswith(".prom") and "\n" not in v),
            'must be "" (off) or an absolute path ending in .prom (node_exporter reads *.prom)',
        ),
    ),
    "health": (
        ("timeout", lambda v: 0 < v <= 300, "must be > 0 and at most 300 seconds"),
        ("libvirt_timeout", lambda v: v > 0, "must be > 0 seconds"),
    ),
    "mount": (
        ("timeout", lambda v: v > 0, "must be > 0 seconds"),
        ("attempt_timeout", lambda v: v > 0, "must be > 0 seconds"),
    ),
    "image": (
        ("memory", lambda v: v is None or v >= 64, "must be at least 64 (MiB)"),
        ("vcpus", lambda v: v is None or v >= 1, "must be at least 1"),
        ("cvmfs_cache_gib", lambda v: v is None or v >= 0, "must be >= 0 (0: no disk)"),
        ("scratch_gib", lambda v: v is None or v >= 0, "must be >= 0 (0: no disk)"),
        ("refresh_interval", lambda v: v >= 0, "must be >= 0 seconds (0: never)"),
        (
            "description",
            lambda v: len(v) <= 200 and v.isprintable(),
            "must be one line of at most 200 printable characters",
        ),
    ),
}
