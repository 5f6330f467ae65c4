"""The node agent: a job the scheduler suspends has its VM paused, and continued on resume.

Neither scheduler runs anything as root when it suspends a job (docs/research/
suspend-checkpoint-migrate.md, section 1 and 2): Slurm 22.05 sends the job's processes
SIGTSTP, SIGSTOP 2 s later and SIGCONT on resume (``slurmstepd/req.c:_handle_suspend``,
``_handle_resume``), or freezes their cgroup with ``proctrack/cgroup``
(``proctrack_cgroup.c:proctrack_p_signal``); Torque 6.1 sends SIGTSTP, SIGSTOP 5 s later
and SIGCONT (``resmom/requests.c:resume_suspend``). The VM's QEMU is not among the job's
processes, so without help it runs on at full speed through the whole suspension.

``vmbatch agent`` (root, one per node, a systemd service) therefore watches the job
starters of the node's running jobs (records in phase ``ready``). When every one of a
job's tasks is stopped (``T`` in ``/proc/PID/stat``) or in a frozen cgroup, it pauses the
job's VM for the reason ``scheduler`` (:mod:`vmbatch.pausing`); when they run again, it
drops that reason and the VM continues. The starter stops itself on SIGTSTP
(:func:`vmbatch.signals.job_control`), so the pause follows the scheduler's first signal
within one poll (:data:`INTERVAL`).

Whose processes: only the scheduler's own root processes are trusted to say which
processes are a job's tasks; the tasks are their children with the job owner's uid.
- Slurm: children of a root ``slurmstepd`` whose command line slurmstepd itself sets to
  ``slurmstepd: [<job>.<step>]`` (``slurmstepd.c``; the ``extern`` step is left out: its
  task is Slurm's own ``sleep``).
- Torque: children of the root ``pbs_mom`` whose environment says ``PBS_JOBID=<job>``.
A user can thus only ever pause or continue a VM of their own, which ``scancel -s STOP``
already lets them do to their job. Task pids are cached with their start time (a reused
pid is not the task) and looked up afresh every :data:`RESCAN` seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from vmbatch import logsetup, pausing
from vmbatch.config import Config
from vmbatch.errors import HostError, JobBusyError, VmBatchError
from vmbatch.hooks.jobstate import READY, Record, StateStore
from vmbatch.hooks.policy import node_state_dir
from vmbatch.libvirt.connection import Connection
from vmbatch.relay import Relays
from vmbatch.state import atomic_write

log = logging.getLogger(__name__)

#: Seconds between two looks at the tasks' state (Slurm stops a job 2 s after SIGTSTP).
INTERVAL = 0.25
#: Seconds after which a job's tasks are looked up again (new ``srun`` steps).
RESCAN = 5.0
PROC = Path("/proc")
CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True, slots=True)
class Proc:
    """What ``/proc/PID/stat`` and ``status`` say of one process."""

    pid: int
    ppid: int
    uid: int
    #: The one-letter state: R, S, D, T (stopped), t (traced), Z, ...
    state: str
    #: Start time in clock ticks since boot: with the pid, names the process uniquely.
    start: int


def read_proc(pid: int, proc: Path = PROC) -> Proc | None:
    """The process ``pid`` now, or None if it is gone (proc(5))."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        status = (proc / str(pid) / "status").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces and parentheses.
    rest = stat[stat.rfind(")") + 2 :].split()
    uid = next((line.split()[1] for line in status.splitlines() if line.startswith("Uid:")), "")
    if len(rest) < 20 or not uid.isdigit():
        return None
    return Proc(pid, int(rest[1]), int(uid), rest[0], int(rest[19]))


def _all(proc: Path) -> Iterator[Proc]:
    for entry in proc.iterdir():
        if entry.name.isdigit() and (p := read_proc(int(entry.name), proc)) is not None:
            yield p


def _exe_name(pid: int, proc: Path) -> str:
    try:
        return (proc / str(pid) / "exe").readlink().name
    except OSError:
        return ""


def _read(path: Path, limit: int = 1 << 16) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(limit)
    except OSError:
        return b""


def _slurm_parent(p: Proc, job_id: str, proc: Path) -> bool:
    # Debian's slurm-wlm installs it as slurmstepd-wlm (``/usr/sbin/slurmstepd`` links there).
    if p.uid != 0 or not _exe_name(p.pid, proc).startswith("slurmstepd"):
        return False
    title = _read(proc / str(p.pid) / "cmdline").split(b"\0")[0].decode(errors="replace")
    prefix = f"slurmstepd: [{job_id}."
    return title.startswith(prefix) and not title.startswith(f"{prefix}extern]")


def _torque_parent(p: Proc, proc: Path) -> bool:
    return p.uid == 0 and _exe_name(p.pid, proc).startswith("pbs_mom")


def find_tasks(record: Record, proc: Path = PROC) -> list[Proc]:
    """The job's tasks: children of the scheduler's root process for this job, with the
    job owner's uid (module docstring)."""
    procs = list(_all(proc))
    if record.scheduler == "slurm":
        parents = {p.pid for p in procs if p.ppid != 0 and _slurm_parent(p, record.job_id, proc)}
        return [p for p in procs if p.ppid in parents and p.uid == record.uid]
    if record.scheduler == "torque":
        moms = {p.pid for p in procs if _torque_parent(p, proc)}
        needle = f"PBS_JOBID={record.job_id}".encode()
        return [
            p
            for p in procs
            if p.ppid in moms
            and p.uid == record.uid
            and needle in _read(proc / str(p.pid) / "environ", 1 << 20).split(b"\0")
        ]
    return []


def frozen(pid: int, proc: Path = PROC, cgroup: Path = CGROUP) -> bool:
    """Whether the process's cgroup is frozen: cgroup v2 ``cgroup.events`` says
    ``frozen 1`` (Slurm's ``cgroup.freeze``), v1's ``freezer.state`` is ``FROZEN``."""
    for line in _read(proc / str(pid) / "cgroup").decode(errors="replace").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        rel = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            events = _read(cgroup / rel / "cgroup.events").decode(errors="replace")
            if "frozen 1" in events.splitlines():
                return True
        elif "freezer" in controllers.split(","):
            state = _read(cgroup / "freezer" / rel / "freezer.state").strip()
            if state == b"FROZEN":
                return True
    return False


def suspended(tasks: list[Proc], proc: Path = PROC) -> bool:
    """Every task stopped or frozen (a job with no task seen is not suspended)."""
    return bool(tasks) and all(t.state in "Tt" or frozen(t.pid, proc) for t in tasks)


@dataclass
class Agent:
    """The loop of ``vmbatch agent``; :meth:`sweep` is one look at every running job."""

    cfg: Config
    proc: Path = PROC
    store: StateStore = field(init=False)
    #: Cached tasks per job: (when looked up, the tasks then).
    _tasks: dict[str, tuple[float, list[Proc]]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    #: Migrated jobs' loopback relays (:mod:`vmbatch.relay`).
    relays: Relays = field(default_factory=Relays)

    def __post_init__(self) -> None:
        self.store = StateStore(self.cfg.batch.state_dir)

    def tasks(self, record: Record) -> list[Proc]:
        now = time.monotonic()
        cached = self._tasks.get(record.job_id)
        if cached is not None and now - cached[0] < RESCAN and cached[1]:
            again = [read_proc(t.pid, self.proc) for t in cached[1]]
            same = [c for c, t in zip(again, cached[1], strict=True) if c and c.start == t.start]
            if len(same) == len(cached[1]):
                return same
        found = find_tasks(record, self.proc)
        self._tasks[record.job_id] = (now, found)
        return found

    def sweep(self, conn: Connection) -> list[str]:
        """Pause or continue each running job's VM as its tasks are; what was done."""
        done = []
        running = {r.job_id: r for r in self.store.records() if r.phase == READY and r.domain}
        for job_id in list(self._tasks):
            if job_id not in running:
                del self._tasks[job_id]
        for record in running.values():
            if record.migrated_to:
                continue  # its VM runs at another libvirtd (docs/admin-guide.md, "Live migration")
            tasks = self.tasks(record)
            if not tasks:
                continue  # not started yet, or ended: nothing to follow
            stop = suspended(tasks, self.proc)
            if stop == (pausing.SCHEDULER in record.pauses):
                continue
            try:
                with logsetup.job(record.job_id), self.store.exclusive(record.job_id, wait=0.0):
                    current = self.store.read(record.job_id)
                    if current is None or current.phase != READY:
                        continue
                    if stop:
                        pausing.add(self.cfg, self.store, conn, current, pausing.SCHEDULER)
                        done.append(f"job {record.job_id}: suspended by the scheduler; VM paused")
                    else:
                        pausing.drop(self.cfg, self.store, conn, current, pausing.SCHEDULER)
                        done.append(f"job {record.job_id}: resumed by the scheduler")
            except JobBusyError:
                continue  # a hook holds the job (its epilogue runs): next time
        return done

    def reconcile(self, conn: Connection) -> None:
        """At start: a VM whose record names a reason to pause is paused (a crash between
        writing the record and pausing the domain left it running)."""
        for record in self.store.records():
            if record.phase == READY and pausing.vm_paused(record.pauses) and record.domain:
                with contextlib.suppress(VmBatchError):
                    conn.suspend(record.domain)

    def run(self, interval: float = INTERVAL) -> None:
        """Sweep every ``interval`` seconds until :attr:`stop` is set; libvirt errors are
        logged and the connection opened again (libvirtd may restart). Migrated jobs'
        relays are kept as their records say on every sweep, and stopped at the end."""
        try:
            self._run(interval)
        finally:
            self.relays.stop()

    def _run(self, interval: float) -> None:
        while not self.stop.is_set():
            try:
                with Connection(self.cfg.libvirt) as conn:
                    self.reconcile(conn)
                    while not self.stop.is_set():
                        for line in self.sweep(conn):
                            log.info("%s", line)
                        self.relays.sync(self.store.records())
                        self.stop.wait(interval)
            except VmBatchError as exc:
                log.warning("agent: %s; trying again in 5s", exc)
                self.stop.wait(5.0)


def pid_file(cfg: Config) -> Path:
    """Where the running agent names itself (root-only: the node's state directory)."""
    return node_state_dir(cfg) / "agent.json"


def running(cfg: Config) -> int | None:
    """The pid of this node's running agent, or None (no pid file, or its process is
    gone or another one now: the pid and its start time must both match)."""
    try:
        raw = json.loads(pid_file(cfg).read_bytes())
        pid, start = int(raw["pid"]), int(raw["start"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    p = read_proc(pid)
    return pid if p is not None and p.start == start else None


def serve(cfg: Config, interval: float = INTERVAL) -> None:
    """``vmbatch agent``: run until SIGTERM or SIGINT."""
    agent = Agent(cfg)
    me = read_proc(os.getpid())
    other = running(cfg)
    if other is not None and other != os.getpid():
        raise HostError(
            f"another vmbatch agent runs on this node (pid {other})",
            hint="one agent per node: stop the other one (systemctl status vmbatch-agent)",
        )

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        agent.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    path = pid_file(cfg)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"pid": os.getpid(), "start": me.start if me else 0}).encode())
    log.info("agent: watching the jobs of this node every %.2fs", interval)
    try:
        agent.run(interval)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    log.info("agent: stopped")
