"""The reaper: remove what no live job owns any more, and never what a live job owns.

``vmbatch cleanup --stale`` calls :func:`reap` (by hand, from a systemd timer or cron), and
so can the start of every prologue: it is cheap when there is nothing to do (one libvirt
listing, one pass over ``/proc``, a directory listing each for jobs, user directories,
state and the image cache; the scheduler is asked only about jobs older than the grace).

What belongs to whom. Everything of a job is found from its job id alone: the domain
(``vmbatch-<id>``, with the id, user and scheduler in its ``<metadata>``), the job directory
``[paths].job_dir/<id>``, the user directory ``[batch].user_dir/<id>``, the state record
``[batch].state_dir/<id>.json`` and its lock, the image cache's in-use markers
``*.img.jobs/<id>``. For each job id found in any of them the reaper decides once whether
the job still lives (:func:`judge`), in this order:

1. A batch job's state record: the node rebooted since its prologue -> gone. A job kept
   for inspection (``[batch].keep_failed``): alive until its ``kept_until``, gone after,
   whatever the scheduler says (it has forgotten the job). Its prologue
   started less than ``[batch].reap_grace`` seconds ago -> alive (a job between prologue
   and starter is never touched). Otherwise the scheduler decides (:class:`SchedulerQuery`):
   Slurm's ``squeue`` (job unknown or ended -> gone; pending again, i.e. requeued -> gone:
   it runs nowhere; any other state -> alive), Torque's pbs_mom job file
   (``mom_priv/jobs/<id>.JB``, there while the job is on this node). A scheduler that
   cannot be asked (command fails or times out) -> undecided: left alone and reported.
2. A ``vmbatch run``'s ``owner`` file (PID, start time, boot id): alive while that process
   is; a run domain whose job directory is gone -> gone.
3. A batch domain without a record: the scheduler decides, as in 1; unless its metadata
   says it was migrated here from another node (``hosted-for``, ``vmbatch migrate``): that
   node's job, whose epilogue ends it -> alive (this node's scheduler does not know it).
4. Files alone: alive while the process that marked an image for it lives, or while they
   changed within the grace; else gone, unless libvirt could not be asked and a job
   directory is involved (a VM may use it: undecided).

Only this configuration's VMs are judged: a domain counts only if its XML names a file in
``[paths].job_dir`` (another vmbatch configuration on the same libvirtd is not ours).
What is gone is removed in the same order a teardown would: lost QEMU processes, injection
appliances, the domain and files (:func:`vmbatch.hooks.batch.finish` for batch jobs, under
the job's state lock: a job whose lock a hook holds is skipped; a record replaced meanwhile
by a new prologue is kept), then in-use markers. Besides, independent of jobs:

- QEMU processes libvirt does not know (:func:`find_qemus`): found by ``-name
  guest=vmbatch-...`` and ``-uuid`` on their command line (libvirt's form: ``-name
  guest=NAME,debug-threads=on``, ``-uuid UUID``; QEMU's option syntax:
  https://www.qemu.org/docs/master/system/invocation.html) and a file in
  ``[paths].job_dir``, running ``[tools].qemu_system`` as root or QEMU's account; killed
  only when no domain libvirt lists (running or defined) has their UUID and their job is
  gone, by PID through a pidfd after checking the start time again
  (:func:`vmbatch.process.kill_identified`). Never by name alone.
- Injection appliances (guestfish and its QEMU, tagged by :func:`vmbatch.process.new_tag`)
  whose tag file is in no job directory any more: the job directory went while they ran.
  Theirs are root's processes with this configuration's libguestfs cache directory in
  their environment and a file of ``[paths].job_dir`` on the command line of one of them.
  Found in ``/proc`` before the tag files are read, so an appliance started meanwhile
  always has its tag file already (it is written before the appliance starts). The
  appliance of a job that is gone is stopped even when libvirt does not answer.
- The image cache's left-overs of dead fetchers (:meth:`vmbatch.images.cache.ImageCache.sweep`).
- Kept checkpoints (``[checkpoint].dir``): a Slurm job's are kept and marked when its
  other files go (it may have been requeued), and removed once Slurm says the job ended
  (:meth:`_Reap._checkpoints`); never from the prologue's quick pass.

vmbatch reserves no ports (QEMU's forward binds port 0 and the kernel picks one), so there
is nothing of that kind to reap. Only one reaper runs at a time per job directory (a
``flock`` on ``[paths].job_dir/.reaper.lock``); a second one returns at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmbatch import checkpoint, logsetup, metrics, process, state, trust
from vmbatch.config import Config
from vmbatch.contextualize import inject
from vmbatch.errors import CommandError, HostError, JobBusyError, VmBatchError
from vmbatch.hooks import batch, slurm
from vmbatch.hooks.jobstate import FAILED, KEPT, Record, StateStore, UserDir
from vmbatch.images.cache import ImageCache, Marker
from vmbatch.libvirt.connection import Connection, DomainInfo
from vmbatch.libvirt.domain import DOMAIN_PREFIX, domain_name
from vmbatch.lifecycle import teardown
from vmbatch.state import JobDir, safe_job_id

log = logging.getLogger(__name__)

#: Seconds a SIGKILLed process may take to be gone (QEMU releasing guest memory).
KILL_WAIT = 10.0
#: The reaper's own lock in ``[paths].job_dir`` (a dot file: no job directory is named so).
LOCK_NAME = ".reaper.lock"


# -- what the scheduler says ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a job still lives: ``runs`` True (leave it), False (it no longer runs here:
    reap it) or None (cannot tell: leave it and report why)."""

    runs: bool | None
    reason: str
    #: The job waits to run again (requeued): its VM is gone, but its checkpoints stay.
    waiting: bool = False


#: ``(scheduler, job id) -> Verdict``: "slurm" or "torque" and the scheduler's job id.
SchedulerCheck = Callable[[str, str], Verdict]

#: squeue(1) "JOB STATE CODES" (Slurm 22.05) of a job that ended: it runs nowhere.
SLURM_ENDED = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "TIMEOUT",
    }
)
#: States of a job waiting for an allocation (again, after a requeue): it runs nowhere, and
#: a later start on this node begins with a prologue that takes the job's lock first.
#: Every other state (RUNNING, CONFIGURING, COMPLETING, SUSPENDED, REQUEUED, ..., and any
#: state this list does not know) counts as alive.
SLURM_WAITING = frozenset({"PENDING", "RESV_DEL_HOLD", "SPECIAL_EXIT"})
#: What squeue 22.05 prints (exit 1) for a job id slurmctld does not know (any more: a
#: finished job is forgotten MinJobAge seconds after it ended); measured. Any other failure
#: ("Unable to contact slurm controller", after ~18 s here) means Slurm was not asked.
SLURM_UNKNOWN_JOB = "Invalid job id specified"


def slurm_verdict(returncode: int, stdout: str, stderr: str) -> Verdict:
    """The verdict from ``squeue -h --jobs=ID --states=all --format=%T``.

    ``--states=all``: without it squeue shows only pending, running and completing jobs,
    and a job that ended would print nothing. States: squeue(1), "JOB STATE CODES"
    (https://slurm.schedmd.com/archive/slurm-22.05.8/squeue.html); both measured on 22.05.
    """
    if returncode != 0:
        if SLURM_UNKNOWN_JOB in stderr:
            return Verdict(False, "job no longer known to Slurm")
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {returncode}"
        return Verdict(None, f"cannot ask Slurm: squeue: {last}")
    states = stdout.split()
    if not states:
        return Verdict(None, "squeue printed no state for the job")
    alive = [s for s in states if s not in SLURM_ENDED | SLURM_WAITING]
    if alive:
        return Verdict(True, f"job {alive[0]} in Slurm")
    if any(s in SLURM_WAITING for s in states):
        return Verdict(
            False, f"job {states[0]} in Slurm (requeued: it runs nowhere now)", waiting=True
        )
    return Verdict(False, f"job {states[0]} in Slurm")


def torque_verdict(jobs_dir: Path, job_id: str) -> Verdict:
    """Whether pbs_mom still has the job: its job file ``<id>.JB`` (or the script copy
    ``<id>.SC``, same prefix) in ``mom_priv/jobs``, which pbs_mom keeps from the job's
    arrival until after its epilogue (Torque source, src/include/pbs_job.h:
    ``JOB_FILE_SUFFIX ".JB"``, ``JOB_SCRIPT_SUFFIX ".SC"``). Local: no pbs_server round trip.
    """
    if not batch.JOB_ID.fullmatch(job_id):
        return Verdict(None, f"job id {job_id[:60]!r} is not a Torque job id")
    why = trust.untrusted_reason(jobs_dir)
    if why is not None:
        return Verdict(None, f"[batch].torque_jobs_dir is not root's alone: {why}")
    if not jobs_dir.is_dir():
        return Verdict(
            None, f"pbs_mom's job directory {jobs_dir} is missing ([batch].torque_jobs_dir)"
        )
    if any((jobs_dir / f"{job_id}{suffix}").exists() for suffix in (".JB", ".SC")):
        return Verdict(True, "job still on this node's pbs_mom")
    return Verdict(False, "job no longer on this node's pbs_mom")


class SchedulerQuery:
    """The default :data:`SchedulerCheck`: ``squeue`` for Slurm, pbs_mom's files for Torque.

    ``env`` supplies ``SLURM_CONF`` (a Prolog's, or root's); nothing else of it is used.
    After squeue failed once (slurmctld unreachable) this object asks no more: every later
    Slurm job of the same reap is undecided at once instead of costing another timeout.
    """

    def __init__(self, cfg: Config, env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self.env = {k: v for k in ("SLURM_CONF",) if (v := (env or {}).get(k))}
        self.failure: str | None = None

    def __call__(self, scheduler: str, job_id: str) -> Verdict:
        if scheduler == "torque":
            return torque_verdict(self.cfg.batch.torque_jobs_dir, job_id)
        if scheduler != "slurm":
            return Verdict(None, f"unknown scheduler {scheduler!r}")
        if self.failure is not None:
            return Verdict(None, f"Slurm not asked ({self.failure})")
        if not batch.JOB_ID.fullmatch(job_id):
            return Verdict(None, f"job id {job_id[:60]!r} is not a Slurm job id")
        if not slurm.config_present(self.env):
            self.failure = "no slurm.conf: set SLURM_CONF for the reaper"
            return Verdict(None, f"Slurm not asked ({self.failure})")
        try:
            res = process.run(
                [str(self.cfg.tools.squeue), "-h", f"--jobs={job_id}", "--states=all",
                 "--format=%T"],
                timeout=self.cfg.tools.command_timeout,
                check=False,
                env=self.env,
            )  # fmt: skip
        except CommandError as exc:
            verdict = Verdict(None, f"cannot ask Slurm: {exc.message}")
        else:
            verdict = slurm_verdict(res.returncode, res.stdout, res.stderr)
        if verdict.runs is None:
            self.failure = verdict.reason
        return verdict


# -- QEMU processes --------------------------------------------------------------------------


def qemu_options(value: str) -> dict[str, str]:
    """QEMU's ``key=value,...`` option syntax; ``,,`` is a literal comma, and a first
    element without ``=`` is the implied key ``""`` (``-name NAME`` means ``guest=NAME``)."""
    items, current, i = [], [], 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(value[i])
        i += 1
    items.append("".join(current))
    result: dict[str, str] = {}
    for n, item in enumerate(items):
        key, sep, val = item.partition("=")
        if not sep:
            if n == 0:
                result.setdefault("", key)
            continue
        result.setdefault(key, val)
    return result


def qemu_identity(argv: Sequence[str]) -> tuple[str | None, str | None]:
    """The guest name (``-name guest=NAME,...`` or ``-name NAME``) and the lower-case UUID
    (``-uuid``) on a QEMU command line; None for what is missing or malformed."""
    name: str | None = None
    guest_uuid: str | None = None
    for flag, value in itertools.pairwise(argv):
        if flag == "-name" and name is None:
            opts = qemu_options(value)
            name = opts.get("guest") or opts.get("") or None
        elif flag == "-uuid" and guest_uuid is None:
            try:
                guest_uuid = str(uuid.UUID(value))
            except ValueError:
                guest_uuid = None
    return name, guest_uuid


@dataclass(frozen=True, slots=True)
class QemuProcess:
    """A QEMU process named as a vmbatch domain, seen in ``/proc``."""

    pid: int
    #: :func:`vmbatch.state.process_identity` when it was found (checked again before a kill).
    identity: str
    name: str
    uuid: str | None

    @property
    def job_key(self) -> str:
        return safe_job_id(self.name[len(DOMAIN_PREFIX) :])


def find_qemus(job_dir: Path, emulator: Path) -> list[QemuProcess]:
    """QEMU processes whose ``-name`` is a vmbatch domain name and whose command line names
    a file in ``job_dir`` (so, this configuration's), libvirt's or not.

    Only processes of ``emulator`` (``[tools].qemu_system``, libvirt's ``<emulator>`` for
    our domains) running as root or QEMU's account (:func:`vmbatch.trust.qemu_uids`)
    count: any user can start a process with such a command line, but not as those.

    And only QEMUs in this process's network namespace: that of the libvirtd this node's
    vmbatch talks to, which runs in the node's namespace like the hooks (and a guest's
    ``hostfwd`` port is only reachable from there). A libvirtd in a namespace of its own
    on the same host (a migration's destination, as the system tests run one) starts its
    QEMUs in its own; they are not ours to judge, however like ours their names and
    files look (``/proc/PID/ns/net``, namespaces(7)). The mount namespace tells nothing:
    libvirt gives each QEMU a private one (qemu.conf ``namespaces``).
    """
    inside = str(job_dir).rstrip("/") + "/"
    binary = os.path.realpath(emulator)
    owners = trust.qemu_uids() | {0}
    mine = namespaces("self")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            if b"-name" not in raw or entry.stat().st_uid not in owners:
                continue
            exe = str((entry / "exe").readlink()).removesuffix(" (deleted)")  # upgraded
        except OSError:
            continue  # gone meanwhile
        if exe != binary:
            continue
        argv = raw.decode(errors="surrogateescape").split("\0")
        name, guest_uuid = qemu_identity(argv)
        if name is None or not name.startswith(DOMAIN_PREFIX):
            continue
        if not any(inside in arg for arg in argv):
            continue
        if not same_namespaces(int(entry.name), mine):
            continue  # another libvirtd's (one in its own namespaces on this host)
        identity = state.process_identity(int(entry.name))
        if identity is not None:
            found.append(QemuProcess(int(entry.name), identity, name, guest_uuid))
    return found


def namespaces(pid: int | str) -> tuple[int, int] | None:
    """(device, inode) of the process's network namespace; None if it is gone."""
    try:
        st = Path(f"/proc/{pid}/ns/net").stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def same_namespaces(pid: int, mine: tuple[int, int] | None) -> bool:
    return mine is not None and namespaces(pid) == mine


def qemu_namespaces(emulator: Path, guest_uuid: str) -> tuple[str, int] | None:
    """The network namespace (``/proc/PID/ns/net`` and its inode) of the QEMU process of
    ``emulator`` on this host whose ``-uuid`` is ``guest_uuid``, in whatever namespaces it
    runs; None if there is none (a migration's destination on another host)."""
    if not guest_uuid:
        return None
    binary = os.path.realpath(emulator)
    owners = trust.qemu_uids() | {0}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            if guest_uuid.encode() not in raw or entry.stat().st_uid not in owners:
                continue
            exe = str((entry / "exe").readlink()).removesuffix(" (deleted)")
            if exe != binary:
                continue
            _, found = qemu_identity(raw.decode(errors="surrogateescape").split("\0"))
            if found == str(uuid.UUID(guest_uuid)):
                path = entry / "ns" / "net"
                return str(path), path.stat().st_ino
        except (OSError, ValueError):
            continue
    return None


def is_lost(qemu: QemuProcess, names: frozenset[str], uuids: frozenset[str]) -> bool:
    """libvirt knows no domain of this QEMU: none has its UUID (libvirt always passes
    ``-uuid``), or, lacking a UUID on the command line, none has its name."""
    if qemu.uuid is not None:
        return qemu.uuid not in uuids
    return qemu.name not in names


# -- deciding ------------------------------------------------------------------------------


@dataclass
class Job:
    """Everything found on this node for one job id (``key``: the id as a path component)."""

    key: str
    #: The scheduler's (or run's) job id, from a record or domain metadata; else ``key``.
    job_id: str = ""
    record: Record | None = None
    #: From the domain's metadata when there is no record: "slurm", "torque", "none" (run).
    scheduler: str | None = None
    domains: list[str] = field(default_factory=list)
    #: A domain of it without vmbatch metadata (not judged: left alone).
    unlabelled: bool = False
    #: A domain of it migrated here from that node (``vmbatch migrate``), whose job it is.
    hosted_for: str = ""
    jobdir: bool = False
    #: ``vmbatch run``'s owner (PID:START:BOOT) from the job directory.
    owner: str | None = None
    userdir: bool = False
    lockfile: bool = False
    markers: list[Marker] = field(default_factory=list)
    lost_qemus: list[QemuProcess] = field(default_factory=list)
    #: Tags of injection appliances whose tag file is in its job directory.
    tags: list[str] = field(default_factory=list)
    #: The newest change to its files (job directory, user directory, markers).
    newest: float = 0.0

    def __post_init__(self) -> None:
        self.job_id = self.job_id or self.key


def judge(
    job: Job,
    *,
    now: float,
    boot: str,
    grace: float,
    libvirt_ok: bool,
    ask: SchedulerCheck,
) -> Verdict:
    """Whether ``job`` still lives (the rules are in the module docstring)."""
    rec = job.record
    if rec is not None:
        if rec.boot_id != boot:
            return Verdict(False, "the node rebooted since its prologue")
        if rec.phase == KEPT:
            # Its job ended (the scheduler no longer knows it): the time decides alone.
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.kept_until or 0))
            if now < (rec.kept_until or 0):
                return Verdict(True, f"kept for inspection until {until}")
            return Verdict(False, f"kept for inspection until {until}: time is up")
        age = now - rec.started
        if age < grace:
            return Verdict(True, f"its prologue started {age:.0f}s ago, within [batch].reap_grace")
        return ask(rec.scheduler, rec.job_id)
    if job.owner is not None:
        if state.is_alive(job.owner):
            return Verdict(True, "its `vmbatch run` process is alive")
        return Verdict(False, "its `vmbatch run` process is gone")
    if job.unlabelled:
        return Verdict(True, "a domain of it has no vmbatch metadata")
    if job.hosted_for:
        return Verdict(True, f"its VM was migrated here; {job.hosted_for}'s epilogue ends it")
    if job.domains and job.scheduler == "none" and not job.jobdir:
        return Verdict(False, "its `vmbatch run` lost its job directory")
    if job.domains and job.scheduler in ("slurm", "torque"):
        if now - job.newest < grace:
            return Verdict(True, "its files changed within [batch].reap_grace")
        return ask(job.scheduler, job.job_id)
    if job.domains:
        return Verdict(True, "it has a domain and nothing says its job ended")
    if any(m.writer is not None and state.is_alive(m.writer) for m in job.markers):
        return Verdict(True, "the process that marked its image in use is alive")
    if job.lost_qemus:
        return Verdict(False, "no job owns it any more and libvirt lost its QEMU process")
    if now - job.newest < grace:
        return Verdict(True, "its files changed within [batch].reap_grace")
    if job.jobdir and not libvirt_ok:
        return Verdict(None, "libvirt did not answer: cannot tell whether a VM uses its files")
    return Verdict(False, f"no job owns it; unchanged for {(now - job.newest) / 60:.0f} min")


# -- the report ----------------------------------------------------------------------------


@dataclass
class Report:
    """What one reap did. Each entry is one line a person can act on."""

    dry_run: bool = False
    #: What was removed (with ``dry_run``: would be), and why.
    removed: list[str] = field(default_factory=list)
    #: Left alone although it looked stale: a hook holds it, it changed meanwhile.
    skipped: list[str] = field(default_factory=list)
    #: Left alone because it could not be decided (scheduler or libvirt unreachable).
    undecided: list[str] = field(default_factory=list)
    #: What could not be removed.
    failed: list[str] = field(default_factory=list)
    #: How many of ``removed`` were jobs kept for inspection whose time was up: no
    #: orphans (``vmbatch_orphans_reaped_total`` does not count them).
    kept_expired: int = 0

    def remove(self, subject: str, done: str, would: str, why: str) -> None:
        text = f"would {would}" if self.dry_run else done
        self.removed.append(f"{subject}: {text} ({why})")
        if not self.dry_run:
            log.info("reaped %s: %s (%s)", subject, done, why)

    @property
    def ok(self) -> bool:
        """Nothing failed and nothing was left undecided."""
        return not (self.failed or self.undecided)


# -- the reaper ----------------------------------------------------------------------------


def reap(
    cfg: Config,
    *,
    scheduler_check: SchedulerCheck | None = None,
    conn: Connection | None = None,
    dry_run: bool = False,
    env: Mapping[str, str] | None = None,
    now: float | None = None,
    checkpoints: bool = True,
) -> Report:
    """Remove what no live job owns (see the module docstring); return what was done.

    ``scheduler_check`` defaults to :class:`SchedulerQuery` (with ``SLURM_CONF`` from
    ``env``). ``conn``: an open libvirt connection to use (else one is opened and closed).
    With ``dry_run`` nothing is changed and the report says what would be. Without
    ``checkpoints`` kept checkpoints are not looked at (they need the scheduler).
    Raises only if the reaper's own lock cannot be made; every other failure is reported.
    """
    report = Report(dry_run=dry_run)
    with _alone(cfg.paths.job_dir) as alone:
        if not alone:
            report.skipped.append("another reaper is running; this one did nothing")
            return report
        check = scheduler_check or SchedulerQuery(cfg, env)
        reaping = _Reap(cfg, report, check, time.time() if now is None else now)
        reaping.checkpoints = checkpoints
        reaping.run(conn)
    if not dry_run:
        metrics.count(cfg, metrics.REAPED, len(report.removed) - report.kept_expired)
    return report


@contextlib.contextmanager
def _alone(job_dir: Path) -> Iterator[bool]:
    """Hold the reaper's lock (True), or say another reaper holds it (False).

    The lock file goes when the holder is done, so that the job directory holds job
    directories only; whoever then locks the unlinked file sees that the path no longer
    names it and tries afresh (as :meth:`vmbatch.hooks.jobstate.StateStore.exclusive`).
    """
    path = job_dir / LOCK_NAME
    for _ in range(3):
        try:
            job_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise HostError(
                f"cannot open the reaper's lock {path}: {exc.strerror}",
                hint="run `vmbatch cleanup --stale` as root; check [paths].job_dir",
            ) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                same = path.lstat().st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                continue  # the last holder removed it meanwhile
            try:
                yield True
            finally:
                path.unlink(missing_ok=True)  # still held: see above
            return
        finally:
            os.close(fd)
    yield False  # the lock file keeps being replaced: another reaper is at work


class _Reap:
    def __init__(self, cfg: Config, report: Report, ask: SchedulerCheck, now: float) -> None:
        self.cfg = cfg
        self.report = report
        self.ask = ask
        self.now = now
        self.dry = report.dry_run
        self.store = StateStore(cfg.batch.state_dir)
        self.cache = ImageCache(cfg)
        self.jobs: dict[str, Job] = {}
        self.conn: Connection | None = None
        self.names: frozenset[str] = frozenset()
        self.uuids: frozenset[str] = frozenset()
        self.running_tags: Mapping[str, list[int]] = {}
        self.checkpoints = True

    def job(self, key: str, job_id: str | None = None) -> Job:
        found = self.jobs.setdefault(key, Job(key, job_id or key))
        if job_id is not None and found.job_id == key:
            found.job_id = job_id
        return found

    # -- the pass ------------------------------------------------------------------------

    def run(self, conn: Connection | None) -> None:
        # Processes first: whatever starts after this snapshot is not judged this time, and
        # every appliance found here had its tag file written before it started.
        qemus = find_qemus(self.cfg.paths.job_dir, self.cfg.tools.qemu_system)
        cachedir = str(self.cfg.paths.cache_dir / "libguestfs")
        self.running_tags = running_tags = process.tags_in_use({"LIBGUESTFS_CACHEDIR": cachedir})
        own = conn is None
        try:
            libvirt_ok = self._libvirt(conn)
            if libvirt_ok:
                for q in qemus:
                    if is_lost(q, self.names, self.uuids):
                        self.job(q.job_key).lost_qemus.append(q)
            self._collect()
            self._orphan_appliances(running_tags)
            boot = state.boot_id()
            for key in sorted(self.jobs):
                job = self.jobs[key]
                verdict = judge(
                    job,
                    now=self.now,
                    boot=boot,
                    grace=self.cfg.batch.reap_grace,
                    libvirt_ok=libvirt_ok,
                    ask=self.ask,
                )
                with logsetup.job(job.job_id):  # its lines name it, not the caller's job
                    self._act(job, verdict, libvirt_ok)
            if self.checkpoints:
                self._checkpoints()
            self._sweep_cache()
        finally:
            if own and self.conn is not None:
                self.conn.close()

    def _libvirt(self, conn: Connection | None) -> bool:
        """Our domains and every name and UUID libvirt knows; False if libvirt did not answer."""
        inside = str(self.cfg.paths.job_dir).rstrip("/") + "/"
        try:
            self.conn = conn if conn is not None else Connection(self.cfg.libvirt).open()
            doms: list[DomainInfo] = self.conn.list_vmbatch()
            self.names, self.uuids = self.conn.known_domains()
        except VmBatchError as exc:
            self.report.undecided.append(
                f"libvirt: {exc}; VMs, lost QEMU processes and job directories not checked"
            )
            return False
        for dom in doms:
            if not any(f.startswith(inside) for f in dom.files):
                continue  # another configuration's VM
            meta = dom.metadata
            if meta is None:
                job = self.job(safe_job_id(dom.name[len(DOMAIN_PREFIX) :]))
                job.unlabelled = True
            else:
                job = self.job(safe_job_id(meta.job_id), meta.job_id)
                job.scheduler = job.scheduler or meta.scheduler
                job.hosted_for = job.hosted_for or meta.hosted_for
            job.domains.append(dom.name)
        return True

    def _collect(self) -> None:
        """Records, lock files, job directories, user directories, in-use markers."""
        for rec in self.store.records():
            job = self.job(safe_job_id(rec.job_id), rec.job_id)
            job.record = rec
            job.scheduler = rec.scheduler
        if self.store.dir.is_dir():
            for lock in self.store.dir.glob("*.lock"):
                if not lock.name.startswith("."):
                    self.job(lock.name[: -len(".lock")]).lockfile = True
        for path in _subdirs(self.cfg.paths.job_dir):
            job = self.job(path.name)
            job.jobdir = True
            job.newest = max(job.newest, _mtime(path))
            with contextlib.suppress(OSError):
                job.owner = (path / "owner").read_text().strip() or None
            for tag_file in path.glob(f"{inject.WORK_PREFIX}*/{inject.TAG_FILE}"):
                with contextlib.suppress(OSError):
                    tag = tag_file.read_text().strip()
                    if process.TAG_PATTERN.fullmatch(tag):
                        job.tags.append(tag)
        for path in _subdirs(self.cfg.batch.user_dir):
            job = self.job(path.name)
            job.userdir = True
            job.newest = max(job.newest, _mtime(path))
        for marker in self.cache.markers():
            job = self.job(marker.job)
            job.markers.append(marker)
            job.newest = max(job.newest, marker.mtime)

    # -- acting --------------------------------------------------------------------------

    def _act(self, job: Job, verdict: Verdict, libvirt_ok: bool) -> None:
        subject = f"job {job.job_id}"
        if verdict.runs is None:
            self.report.undecided.append(f"{subject}: left alone: {verdict.reason}")
            return
        if verdict.runs:
            for q in job.lost_qemus:
                self.report.skipped.append(
                    f"{subject}: QEMU process {q.pid} ({q.name}), unknown to libvirt, left"
                    f" alone: {verdict.reason}"
                )
            return
        try:
            for q in job.lost_qemus:  # libvirt's own VM of the job is never among them
                self._kill_qemu(subject, q)
            rec = job.record
            if rec is not None or job.scheduler in ("slurm", "torque"):
                if libvirt_ok or (rec is not None and rec.phase == FAILED):
                    before = len(self.report.removed)
                    self._finish(subject, job, verdict.reason)
                    if rec is not None and rec.phase == KEPT:
                        self.report.kept_expired += int(len(self.report.removed) > before)
                    return
                # Without libvirt only what needs none: its injection appliance.
                with self.store.exclusive(job.key, wait=0):
                    if self.store.read(job.key) == rec:
                        self._stop_appliances(subject, job, verdict.reason)
                self.report.undecided.append(
                    f"{subject}: left alone: libvirt did not answer, so its VM cannot be made"
                    f" sure of ({verdict.reason})"
                )
            elif job.owner is not None or job.scheduler == "none":
                if libvirt_ok:
                    self._reap_run(subject, job, verdict.reason)
                    return
                self._stop_appliances(subject, job, verdict.reason)  # run ids are never reused
                self.report.undecided.append(
                    f"{subject}: left alone: libvirt did not answer ({verdict.reason})"
                )
            else:
                self._remove_files(subject, job, verdict.reason)
        except JobBusyError:
            self.report.skipped.append(f"{subject}: left alone: a vmbatch hook is working on it")
        except VmBatchError as exc:
            self.report.failed.append(f"{subject}: {exc}")

    def _kill_qemu(self, subject: str, q: QemuProcess) -> None:
        what = f"QEMU process {q.pid} ({q.name})"
        why = f"libvirt knows no domain {'with UUID ' + q.uuid if q.uuid else 'of that name'}"
        if self.dry:
            self.report.remove(subject, "", f"kill {what}", why)
        elif process.kill_identified(q.pid, q.identity, timeout=KILL_WAIT):
            self.report.remove(subject, f"{what} killed", "", why)

    def _stop_appliances(self, subject: str, job: Job, why: str) -> None:
        """Kill the injection appliance of a gone job (needs no libvirt)."""
        if not any(t in self.running_tags for t in job.tags):
            return
        if self.dry:
            self.report.remove(subject, "", "kill its injection appliance", why)
            return
        pids = inject.stop_leftovers(JobDir(self.cfg.paths.job_dir, job.key))
        if pids:
            killed = f"injection appliance killed (PIDs {' '.join(map(str, sorted(pids)))})"
            self.report.remove(subject, killed, "", why)

    def _parts(self, job: Job) -> tuple[str, str]:
        """("domain X destroyed, A, B removed", "destroy domain X, remove A, B")."""
        files = [
            name
            for name, present in (
                ("job directory", job.jobdir),
                ("user directory", job.userdir),
                ("state record", job.record is not None),
                ("image in-use marker", bool(job.markers)),
            )
            if present
        ]
        done = [f"domain {d} destroyed" for d in job.domains]
        would = [f"destroy domain {d}" for d in job.domains]
        if any(t in self.running_tags for t in job.tags):  # teardown stops it first
            done.append("injection appliance killed")
            would.append("kill its injection appliance")
        if files:
            done.append(f"{', '.join(files)} removed")
            would.append(f"remove {', '.join(files)}")
        return ", ".join(done) or "nothing left", ", ".join(would) or "do nothing"

    def _finish(self, subject: str, job: Job, why: str) -> None:
        done, would = self._parts(job)
        if self.dry:
            self.report.remove(subject, done, would, why)
            return
        finished = batch.finish(
            self.cfg,
            job.job_id,
            job.record,
            conn=self.conn,
            lock_wait=0,
            if_unchanged=True,
            # Slurm's: a requeued job's next run restores them (see _checkpoints); Torque's
            # go as the epilogue's would (pbs_mom knows only its own node's jobs).
            checkpoints="keep" if job.scheduler == "slurm" else "job_end",
        )
        if finished:
            self.report.remove(subject, done, would, why)
        else:
            self.report.skipped.append(f"{subject}: left alone: a new prologue took it over")

    def _reap_run(self, subject: str, job: Job, why: str) -> None:
        done, would = self._parts(job)
        if self.dry:
            self.report.remove(subject, done, would, why)
            return
        jobdir = JobDir(self.cfg.paths.job_dir, job.key)
        for name in job.domains or [domain_name(job.job_id)]:
            teardown(self.cfg, self.conn, name, jobdir)
        self.cache.release_job(job.job_id)
        self._release_markers(job)
        self.report.remove(subject, done, would, why)

    def _remove_files(self, subject: str, job: Job, why: str) -> None:
        """Files of no job, under the job's state lock (a prologue of the same id starting
        now waits for it) and only if there is still no record."""
        done, would = self._parts(job)
        if job.lockfile and not (job.jobdir or job.userdir or job.markers):
            done, would = "stale state lock removed", "remove its stale state lock"
        if self.dry:
            self.report.remove(subject, done, would, why)
            return
        with self.store.exclusive(job.key, wait=0):
            if self.store.read(job.key) is not None:
                self.report.skipped.append(f"{subject}: left alone: a prologue took it over")
                return
            if job.jobdir:
                # No VM: stop a leftover appliance, keep the console log, remove the directory.
                teardown(self.cfg, None, "", JobDir(self.cfg.paths.job_dir, job.key))
            if job.userdir:
                UserDir(self.cfg.batch.user_dir, job.key).remove()
            self._release_markers(job)
        # The lock file went with the block (no record): see StateStore.exclusive.
        self.report.remove(subject, done, would, why)

    def _release_markers(self, job: Job) -> None:
        for marker in job.markers:
            marker.path.unlink(missing_ok=True)

    def _orphan_appliances(self, running: Mapping[str, list[int]]) -> None:
        """Kill appliances whose tag file is in no job directory (read after ``running``)."""
        known = {t for job in self.jobs.values() for t in job.tags}
        inside = (str(self.cfg.paths.job_dir).rstrip("/") + "/").encode()
        for tag, pids in sorted(running.items()):
            if tag in known or not any(inside in _cmdline(pid) for pid in pids):
                continue  # alive, or another configuration's (its disk is elsewhere)
            subject = f"injection appliance {tag[:8]}"
            why = "its job directory is gone"
            if self.dry:
                listed = " ".join(map(str, sorted(pids)))
                self.report.remove(subject, "", f"kill PIDs {listed}", why)
                continue
            try:
                killed = process.kill_tagged(tag, timeout=KILL_WAIT)
            except HostError as exc:
                self.report.failed.append(f"{subject}: {exc}")
                continue
            if killed:
                self.report.remove(subject, f"PIDs {' '.join(map(str, killed))} killed", "", why)

    def _checkpoints(self) -> None:
        """Kept checkpoints of Slurm jobs that ended for good (:mod:`vmbatch.checkpoint`).

        Checkpoints kept for a job's next run carry the ``requeue`` mark (written by
        ``--stop``, by the Epilog of a requeued job, and by this reaper when it finishes a
        Slurm job, which it cannot tell from a requeue: a node failure); a job's next
        prologue clears it. If the job never runs again (cancelled while it waits), nobody
        else removes them. A marked directory is removed here when no record of the job is
        on this node, it is older than ``[batch].reap_grace``, and Slurm says the job ended
        or no longer knows it; never while the job waits or runs. Unmarked directories
        (a running job's) are not looked at, so a shared ``[checkpoint].dir`` costs no
        query per running job. Torque jobs' are left to ``vmbatch cleanup JOB`` (pbs_mom
        knows only its own node's jobs: a requeued job elsewhere looks gone)."""
        self._gone_checkpoints()
        for path in _subdirs(self.cfg.checkpoint.dir):
            if not (path / checkpoint.REQUEUE).exists():
                continue
            owner = checkpoint.owner(path)
            if owner is None or owner[1] != "slurm":
                continue  # no finished checkpoint says whose it is, or not Slurm's
            job_id = owner[0]
            if safe_job_id(job_id) != path.name or self.store.read(job_id) is not None:
                continue  # its job has a record here: the job's own hooks decide
            if self.now - _mtime(path) < self.cfg.batch.reap_grace:
                continue
            verdict = self.ask("slurm", job_id)
            subject = f"checkpoints of job {job_id}"
            if verdict.runs is None:
                self.report.undecided.append(f"{subject}: left alone: {verdict.reason}")
                continue
            if verdict.runs or verdict.waiting:
                continue
            if self.dry:
                self.report.remove(subject, "", f"remove {path}", verdict.reason)
                continue
            try:
                with logsetup.job(job_id), self.store.exclusive(job_id, wait=0):
                    if self.store.read(job_id) is not None:
                        continue  # a new prologue of the job took it over meanwhile
                    checkpoint.clear_requeue(self.cfg, job_id)
                    if checkpoint.discard(self.cfg, job_id):
                        self.report.remove(subject, f"{path} removed", "", verdict.reason)
                    else:
                        self.report.failed.append(f"{subject}: could not remove {path}")
            except JobBusyError:
                self.report.skipped.append(f"{subject}: left alone: a hook holds the job")

    def _gone_checkpoints(self) -> None:
        """What a removal left (:func:`vmbatch.checkpoint.discard` renames a job's
        directory to ``.gone-*`` first; on NFS a file still open elsewhere stays as a
        ``.nfs*`` file and keeps the directory): tried again once older than the grace."""
        try:
            gone = [p for p in self.cfg.checkpoint.dir.glob(checkpoint.GONE + "*") if p.is_dir()]
        except OSError:
            return
        for path in sorted(gone):
            if path.is_symlink() or self.now - _mtime(path) < self.cfg.batch.reap_grace:
                continue
            subject = f"checkpoint left-overs {path.name}"
            if self.dry:
                self.report.remove(subject, "", f"remove {path}", "removed checkpoints")
                continue
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                self.report.failed.append(f"{subject}: could not remove {path}")
            else:
                self.report.remove(subject, f"{path} removed", "", "removed checkpoints")

    def _sweep_cache(self) -> None:
        try:
            swept = self.cache.sweep(
                older_than=self.cfg.batch.reap_grace, now=self.now, dry_run=self.dry
            )
        except OSError as exc:
            self.report.failed.append(f"image cache: {exc}")
            return
        for item in swept:
            self.report.remove(
                "image cache",
                f"{item.what} {item.path.name} removed",
                f"remove {item.what} {item.path.name}",
                item.why,
            )


def _subdirs(base: Path) -> list[Path]:
    """The directories in ``base`` (not following symlinks); none if it does not exist."""
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    return sorted(
        p for p in entries if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
    )


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0
