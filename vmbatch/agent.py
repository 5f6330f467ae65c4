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
already lets them do to their job.

The agent also serves a socket (:func:`socket_path`) on which a job's starter asks for a
checkpoint of its VM when the job gets SIGUSR2 (:class:`Requests`): the kernel says which
process and user asks (``SO_PEERCRED``), and only the job's own starter may.

Task pids are cached with their start time (a reused pid is not the task) and looked up
afresh every :data:`RESCAN` seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from vmbatch import logsetup, pausing
from vmbatch.config import Config
from vmbatch.errors import HostError, JobBusyError, VmBatchError
from vmbatch.hooks.jobstate import READY, Record, StateStore, UserDir
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


def find_tasks(record: Record, proc: Path = PROC, procs: list[Proc] | None = None) -> list[Proc]:
    """The job's tasks: children of the scheduler's root process for this job, with the
    job owner's uid (module docstring). ``procs``: the process table, if already read."""
    procs = list(_all(proc)) if procs is None else procs
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
    #: The process table of the current sweep, read when a job's tasks are looked up.
    _table: list[Proc] | None = None
    #: The last error per job, logged once until it changes.
    _errors: dict[str, str] = field(default_factory=dict)
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
        if self._table is None:  # one walk of /proc per sweep, whatever the number of jobs
            self._table = list(_all(self.proc))
        found = find_tasks(record, self.proc, self._table)
        self._tasks[record.job_id] = (now, found)
        return found

    def sweep(self, conn: Connection) -> list[str]:
        """Pause or continue each running job's VM as its tasks are; what was done."""
        done = []
        self._table = None
        running = {r.job_id: r for r in self.store.records() if r.phase == READY and r.domain}
        for job_id in list(self._tasks):
            if job_id not in running:
                del self._tasks[job_id]
        for record in running.values():
            try:
                done += self._follow(conn, record)
                self._errors.pop(record.job_id, None)
            except (VmBatchError, OSError) as exc:  # this job's: never the other jobs'
                if self._errors.get(record.job_id) != str(exc):
                    self._errors[record.job_id] = str(exc)
                    with logsetup.job(record.job_id):
                        log.warning("agent: %s", exc)
        return done

    def _follow(self, conn: Connection, record: Record) -> list[str]:
        """Pause or continue one job's VM as its tasks are; keep root's note true."""
        done: list[str] = []
        if record.migrated_to:
            return done  # its VM runs at another libvirtd (docs/admin-guide.md, "Live migration")
        if pausing.CHECKPOINT in record.pauses:
            done += self._cut_off_checkpoint(conn, record)
        tasks = self.tasks(record)
        stop = suspended(tasks, self.proc)
        if tasks and stop != (pausing.SCHEDULER in record.pauses):
            try:
                with logsetup.job(record.job_id), self.store.exclusive(record.job_id, wait=0.0):
                    current = self.store.read(record.job_id)
                    if current is None or current.phase != READY:
                        return done
                    if conn.status(current.domain) is None:  # its VM is gone: settle, no act
                        self.store.write(dataclasses.replace(current, pauses=(), paused_at=None))
                        return [*done, f"job {record.job_id}: its VM is gone"]
                    if stop:
                        pausing.add(self.cfg, self.store, conn, current, pausing.SCHEDULER)
                        done.append(f"job {record.job_id}: suspended by the scheduler; VM paused")
                    else:
                        pausing.drop(
                            self.cfg, self.store, conn, current, pausing.SCHEDULER,
                            clock_in_background=True,
                        )  # fmt: skip
                        done.append(f"job {record.job_id}: resumed by the scheduler")
            except JobBusyError:
                return done  # a hook holds the job (its epilogue runs): next time
        self._settle_note(record)
        return done

    def _settle_note(self, record: Record) -> None:
        """Root's pause note says what the record says: a crash between the two writes (or a
        failed note write) would have the starter wait for a VM that runs, or count a pause
        as silence. Rewritten only while no hook holds the job."""
        userdir = UserDir(self.cfg.batch.user_dir, record.job_id)
        note = userdir.read_note()
        if note.stopped or note.paused == bool(record.pauses):
            return
        with contextlib.suppress(JobBusyError), self.store.exclusive(record.job_id, wait=0.0):
            current = self.store.read(record.job_id)
            if (
                current is not None
                and current.phase == READY
                and bool(current.pauses) != note.paused
            ):
                paused = bool(current.pauses)
                pausing.tell_starter(self.cfg, current, paused, new_pause=paused)

    def _cut_off_checkpoint(self, conn: Connection, record: Record) -> list[str]:
        """A checkpoint whose process died (``vmbatch checkpoint`` killed, the agent's
        request thread gone with a crash): it holds the job's lock for its whole length,
        so a free lock with the ``checkpoint`` reason still recorded means nobody will
        take the reason back, and the job's starter would wait for the VM forever.

        If the VM is still there it is made whole and continues
        (:func:`vmbatch.checkpoint.make_whole`): it may be the QEMU the checkpoint had just
        restored from its save (``--continue``), which lacks the memory limit and the SSH
        forward until they are set again, and whose new port the starter must be told. If
        the save had ended it, the starter is told that the VM stopped (it exits with
        [batch].requeue_exit) and the job's checkpoints are kept for its next run, which
        restores the newest complete one."""
        from vmbatch import checkpoint

        try:
            with logsetup.job(record.job_id), self.store.exclusive(record.job_id, wait=0.0):
                current = self.store.read(record.job_id)
                if current is None or pausing.CHECKPOINT not in current.pauses:
                    return []
                if conn.status(current.domain) is not None:
                    log.warning("a checkpoint was cut off (its process died); the VM continues")
                    port = checkpoint.make_whole(self.cfg, self.store, conn, current)
                    return [
                        f"job {record.job_id}: cut-off checkpoint taken back, SSH on port {port}"
                    ]
                log.error(
                    "a checkpoint was cut off after the VM was saved: the job ends here and"
                    " its next run restores its newest complete checkpoint"
                )
                checkpoint.mark_requeue(self.cfg, current.job_id)
                pausing.tell_starter(self.cfg, current, True, stopped=True)
                self.store.write(dataclasses.replace(current, pauses=(), paused_at=None))
                return [f"job {record.job_id}: cut-off checkpoint; its VM is gone, job requeued"]
        except JobBusyError:
            return []  # the checkpoint runs (or another hook): not cut off
        except (VmBatchError, OSError) as exc:
            log.warning("agent: could not settle a cut-off checkpoint of job %s: %s",
                        record.job_id, exc)  # fmt: skip
            return []

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


def socket_path(cfg: Config) -> Path:
    """The agent's socket, in the root-owned directory of the job users' directories
    (``[batch].user_dir``; a dot name, which no job id has): any user may connect."""
    return cfg.batch.user_dir / ".agent.sock"


#: At most this many requests at once, and this many of one user; more are turned away at
#: once. A request must arrive whole within REQUEST_SECONDS (a client that trickles bytes
#: cannot hold a slot).
MAX_CLIENTS, PER_USER, REQUEST_SECONDS = 16, 2, 5.0
#: A job's user may have its VM checkpointed at most once in this many seconds (each one
#: pauses the VM and writes its memory and disks: a loop of SIGUSR2 must not fill the
#: node's disk or stall it).
USER_INTERVAL = 300.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (socket(7), SO_PEERCRED)


def authorize(record: Record | None, job_id: str, pid: int, uid: int, proc: Path = PROC) -> str:
    """Why the process ``pid`` of user ``uid`` may not ask for a checkpoint of job
    ``job_id``; "" if it may. The kernel vouches for pid and uid (SO_PEERCRED); only the
    job's own task (its starter, :func:`find_tasks`) of the job's owner may, or root."""
    if record is None or record.phase != READY:
        return f"job {job_id} has no running VM on this node"
    if uid == 0:
        return ""
    if uid != record.uid:
        return f"job {job_id} is not yours"
    if pid not in {t.pid for t in find_tasks(record, proc)}:
        return f"only job {job_id}'s own starter may ask for its checkpoint"
    return ""


class Requests:
    """The agent's socket: a job's starter asks for a checkpoint of its own VM (on SIGUSR2,
    ``[checkpoint].usr2``), which the user cannot take (libvirt is root's). One JSON line
    each way: ``{"job": ID, "request": "checkpoint"}``, then ``{"ok": bool, "message": str}``
    once the checkpoint is written (or refused)."""

    def __init__(
        self,
        cfg: Config,
        stop: threading.Event,
        take: Callable[[str], str] | None = None,
        proc: Path = PROC,
    ) -> None:
        self.cfg = cfg
        self.proc = proc
        self.stop = stop
        self.store = StateStore(cfg.batch.state_dir)
        self.take = take or self._checkpoint
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._busy: set[str] = set()
        self._per_uid: dict[int, int] = {}
        self._last: dict[str, float] = {}
        self._workers: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def drain(self, seconds: float) -> None:
        """Wait up to ``seconds`` for requests under way (a checkpoint cut off halfway
        leaves its job to the next agent's recovery, :meth:`Agent._cut_off_checkpoint`)."""
        deadline = time.monotonic() + seconds
        for worker in list(self._workers):
            worker.join(max(0.0, deadline - time.monotonic()))

    def _checkpoint(self, job_id: str) -> str:
        from vmbatch import checkpoint

        taken = checkpoint.take(self.cfg, job_id, then="continue")
        return f"checkpoint {taken.checkpoint.generation} written in {taken.seconds:.1f}s"

    def serve(self) -> None:
        """Accept requests until :attr:`stop` is set (run in a thread)."""
        path = socket_path(self.cfg)
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # an earlier agent's: the directory is root's
            self._serve(path)
        except OSError as exc:
            log.error("agent: cannot serve checkpoint requests at %s: %s", path, exc)

    def _serve(self, path: Path) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(path))
            path.chmod(0o666)  # every user's starter connects; SO_PEERCRED says who
            server.listen(16)
            server.settimeout(0.5)
            while not self.stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                if not self._slots.acquire(blocking=False):
                    conn.close()  # too many at once: the client is told by the close
                    continue
                worker = threading.Thread(target=self._handle, args=(conn,), daemon=True)
                self._workers = {w for w in self._workers if w.is_alive()} | {worker}
                worker.start()
        with contextlib.suppress(OSError):
            path.unlink()

    def _handle(self, conn: socket.socket) -> None:
        uid = -1
        try:
            with conn:
                pid, uid, _gid = _PEERCRED.unpack(
                    conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
                )
                with self._lock:  # a user holds at most PER_USER of the MAX_CLIENTS slots
                    if self._per_uid.get(uid, 0) >= PER_USER:
                        uid = -1
                        return
                    self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
                reply = self._answer(_read_line(conn, REQUEST_SECONDS), pid, uid)
                conn.settimeout(None)
                conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError as exc:
            log.warning("agent: a request broke off: %s", exc)
        finally:
            if uid != -1:
                with self._lock:
                    self._per_uid[uid] -= 1
            self._slots.release()

    def _answer(self, line: bytes, pid: int, uid: int) -> dict[str, object]:
        try:
            request = json.loads(line)
            job_id = str(request["job"])
            if request.get("request") != "checkpoint":
                raise ValueError("unknown request")
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "message": "not a request vmbatch knows"}
        with logsetup.job(job_id):
            why = authorize(self.store.read(job_id), job_id, pid, uid, self.proc)
            if why:
                log.warning("refused a checkpoint request of uid %d (pid %d): %s", uid, pid, why)
                return {"ok": False, "message": why}
            with self._lock:
                if job_id in self._busy:
                    return {"ok": False, "message": "a checkpoint of this job is under way"}
                last = self._last.get(job_id)
                if uid != 0 and last is not None and time.monotonic() - last < USER_INTERVAL:
                    return {
                        "ok": False,
                        "message": f"the job's last checkpoint is less than {USER_INTERVAL:.0f}s"
                        " old (at most one in that time)",
                    }
                self._busy.add(job_id)
                self._last[job_id] = time.monotonic()
            try:
                message = self.take(job_id)
                log.info("%s (asked by the job's starter)", message)
                return {"ok": True, "message": message}
            except VmBatchError as exc:
                log.warning("checkpoint asked by the job's starter failed: %s", exc)
                return {"ok": False, "message": str(exc)}
            finally:
                with self._lock:
                    self._busy.discard(job_id)


def _read_line(conn: socket.socket, seconds: float, limit: int = 4096) -> bytes:
    """One line from ``conn`` within ``seconds`` in all (TimeoutError after)."""
    deadline = time.monotonic() + seconds
    data = b""
    while b"\n" not in data and len(data) < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        conn.settimeout(left)
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def ask_checkpoint(cfg: Config, job_id: str) -> tuple[bool, str]:
    """The job starter's request (:class:`Requests`): (taken, what the agent said)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(cfg.checkpoint.timeout + 60)
            sock.connect(str(socket_path(cfg)))
            sock.sendall(json.dumps({"job": job_id, "request": "checkpoint"}).encode() + b"\n")
            reply = json.loads(sock.makefile("rb").readline(65536) or b"{}")
    except (OSError, ValueError) as exc:
        return False, f"the node agent did not answer ({exc}): is vmbatch agent running?"
    return bool(reply.get("ok")), str(reply.get("message", "the agent closed the connection"))


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
    requests = Requests(cfg, agent.stop)
    threading.Thread(target=requests.serve, name="agent requests", daemon=True).start()
    path = pid_file(cfg)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"pid": os.getpid(), "start": me.start if me else 0}).encode())
    log.info("agent: watching the jobs of this node every %.2fs", interval)
    try:
        agent.run(interval)
        requests.drain(2 * cfg.checkpoint.timeout + 60)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        with contextlib.suppress(OSError):  # the request thread is a daemon: gone with us
            socket_path(cfg).unlink()
    log.info("agent: stopped")
