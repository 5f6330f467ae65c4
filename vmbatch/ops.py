"""The operator's commands: ``vmbatch ps``, ``logs``, ``ssh`` and ``console``.

Where each looks, and who may:

- ``ps`` joins libvirt's view of the node's vmbatch domains (their ``<metadata>``: job id,
  user, scheduler, image; ``virDomainGetInfo``: state, vCPUs, memory; the domain type:
  the accelerator) with the batch hooks' state records (``[batch].state_dir``, root only:
  the phase, when the prologue started, kept jobs). Root gets everything over a read-write
  connection (the SSH port from QEMU's ``info usernet``); other users get a read-only
  connection (libvirt grants it to local users by default: https://libvirt.org/aclpolkit.html)
  and no phase.
- ``logs`` reads the job directory's ``console.log`` (the guest's serial console, written
  by virtlogd as root) and ``vmbatch.log`` (root's hook lines of the job), so it is root's.
- ``ssh`` logs in with the job's own key and the pinned host key. The job's user reads them
  from their own directory (``[batch].user_dir/<job>``, what the job starter uses); root
  reads the copy in the job directory's root-only ``keys/`` (written at boot), never a
  file the job's user controls.
- ``console`` (root) attaches to the serial console through libvirt's console stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pwd
import re
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import paramiko

from vmbatch import logsetup, pausing
from vmbatch.config import Config
from vmbatch.contextualize.keys import KeyPair
from vmbatch.errors import GuestConnectionError, JobError, VmBatchError
from vmbatch.guest import ssh
from vmbatch.hooks.jobstate import KEPT, Record, StateStore, UserDir
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import DOMAIN_PREFIX, domain_name
from vmbatch.state import JobDir, safe_job_id

log = logging.getLogger(__name__)

#: The escape character of ``vmbatch console`` (Ctrl-], as ``virsh console``).
ESCAPE = b"\x1d"

# -- ps ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PsRow:
    """One job VM on the node (``vmbatch ps --json`` prints these keys, always all)."""

    job_id: str
    user: str | None
    scheduler: str | None
    image: str | None
    domain: str | None
    #: libvirt's state (``running``, ``paused``, ...); None: no domain (kept disks, or
    #: a prologue that has not made it yet).
    state: str | None
    #: The state record's phase (``preparing``, ``ready``, ``failed``, ``kept``; ``run``
    #: for ``vmbatch run``); None: not known (no record, or not root).
    phase: str | None
    #: When its prologue (or run) began, epoch seconds, and its age then.
    started: float | None
    age_seconds: float | None
    vcpus: int | None
    memory_mib: int | None
    ssh_port: int | None
    #: ``kvm`` or ``tcg``.
    accelerator: str | None
    #: Kept jobs: ``paused`` or ``disks``, and until when (epoch seconds).
    kept_as: str | None
    kept_until: float | None
    #: Why its running VM is paused (``operator``, ``scheduler``, ``checkpoint``:
    #: :mod:`vmbatch.pausing`); empty: not paused by vmbatch; None: not known.
    pauses: list[str] | None = None
    #: A VM ``vmbatch migrate`` moved: the libvirt URI it runs at now (its state then
    #: reads ``migrated``, its SSH port is the relay's on this node).
    migrated_to: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def ps_rows(cfg: Config, *, root: bool, now: float | None = None) -> list[PsRow]:
    """Every vmbatch domain libvirt runs and (root) every job with a state record."""
    now = time.time() if now is None else now
    records: dict[str, Record] = {}
    if root:
        records = {safe_job_id(r.job_id): r for r in StateStore(cfg.batch.state_dir).records()}
    rows: list[PsRow] = []
    seen: set[str] = set()
    with Connection(cfg.libvirt, read_only=not root) as conn:
        for dom in conn.list_vmbatch():
            meta = dom.metadata
            job_id = meta.job_id if meta else dom.name[len(DOMAIN_PREFIX) :]
            key = safe_job_id(job_id)
            seen.add(key)
            rec = records.get(key)
            try:
                st = conn.status(dom.name)
            except VmBatchError as exc:
                log.warning("cannot read the state of %s: %s", dom.name, exc)
                st = None
            started = _started(cfg, rec, job_id)
            rows.append(
                PsRow(
                    job_id=job_id,
                    user=meta.user if meta else (rec.user if rec else None),
                    scheduler=meta.scheduler if meta else (rec.scheduler if rec else None),
                    image=(meta.image if meta else None) or (rec.image if rec else None),
                    domain=dom.name,
                    state=st.state if st else None,
                    phase=_phase(rec, meta.scheduler if meta else None),
                    started=started,
                    age_seconds=None if started is None else round(max(0.0, now - started), 1),
                    vcpus=st.vcpus if st else None,
                    memory_mib=st.memory_mib if st else None,
                    ssh_port=_port(cfg, conn, dom.name, job_id, root),
                    accelerator=dom.accel or None,
                    kept_as=rec.kept_as if rec else None,
                    kept_until=rec.kept_until if rec else None,
                    pauses=list(rec.pauses) if rec else None,
                )
            )
    for key, rec in records.items():
        if key in seen:
            continue
        started = rec.started or None
        moved = bool(rec.migrated_to)
        rows.append(
            PsRow(
                job_id=rec.job_id,
                user=rec.user,
                scheduler=rec.scheduler,
                image=rec.image or None,
                domain=rec.domain if moved else None,
                state="migrated" if moved else None,
                phase=rec.phase,
                started=started,
                age_seconds=None if started is None else round(max(0.0, now - started), 1),
                vcpus=None,
                memory_mib=None,
                ssh_port=rec.relay_port or None,
                accelerator=None,
                kept_as=rec.kept_as,
                kept_until=rec.kept_until,
                pauses=list(rec.pauses),
                migrated_to=rec.migrated_to or None,
            )
        )
    return sorted(rows, key=lambda r: (r.started or 0.0, r.job_id))


def _phase(rec: Record | None, scheduler: str | None) -> str | None:
    if rec is not None:
        return rec.phase
    return "run" if scheduler == "none" else None


def _started(cfg: Config, rec: Record | None, job_id: str) -> float | None:
    """The prologue's start from the record; else when the job directory's ``keys/`` was
    last written (at boot: readable by anyone, the job directory is 0711)."""
    if rec is not None and rec.started:
        return rec.started
    try:
        return JobDir(cfg.paths.job_dir, job_id).keys.stat().st_mtime
    except OSError:
        return None


def _port(cfg: Config, conn: Connection, name: str, job_id: str, root: bool) -> int | None:
    """Root: QEMU's forward (``info usernet``, needs a read-write connection). Others:
    the port in their own job's directory, if this is theirs."""
    if root:
        try:
            return conn.ssh_port(name, cfg.ssh.port)
        except VmBatchError as exc:
            log.info("no SSH port for %s: %s", name, exc)
            return None
    try:
        info = UserDir(cfg.batch.user_dir, job_id).guest()
    except (OSError, ValueError):
        return None
    port = info.get("port") if info else None
    return port if isinstance(port, int) else None


def age_text(seconds: float | None) -> str:
    """``42s``, ``7m05s``, ``3h12m``, ``2d04h``."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def ps_table(rows: list[PsRow], *, now: float | None = None) -> list[str]:
    """The rows as lines of a table whose columns are as wide as their widest value, so a
    long Torque job id (``123[45].torque-server.example.org``) never shifts the rest."""
    now = time.time() if now is None else now
    header = ("JOB", "USER", "IMAGE", "STATE", "PHASE", "AGE", "CPUS", "MEM", "SSH", "ACCEL")
    table = [header]
    for r in rows:
        phase = r.phase or "-"
        if r.phase == KEPT and r.kept_until is not None:
            left = age_text(max(0.0, r.kept_until - now))
            phase = f"kept:{r.kept_as or '?'} ({left} left)"
        elif r.pauses:
            phase = f"{phase}:paused({','.join(r.pauses)})"
        table.append(
            (
                r.job_id,
                r.user or "-",
                r.image or "-",
                r.state or "-",
                phase,
                age_text(r.age_seconds),
                "-" if r.vcpus is None else str(r.vcpus),
                "-" if r.memory_mib is None else f"{r.memory_mib}M",
                "-" if r.ssh_port is None else str(r.ssh_port),
                r.accelerator or "-",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    right = {5, 6, 7, 8}  # numbers
    lines = []
    for row in table:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


# -- logs ----------------------------------------------------------------------------------

#: How often ``logs --follow`` looks for new lines.
FOLLOW_INTERVAL = 0.5
#: At most this much of each file is read for ``--lines`` (virtlogd rolls over at 2 MiB).
TAIL_BYTES = 4 << 20


def log_sources(cfg: Config, job_id: str) -> tuple[JobDir, list[tuple[str, Path]]]:
    """The job directory and its logs, labelled; the kept copy of the console log
    (``[paths].console_log_dir``) if the directory is gone. JobError if there is none."""
    jobdir = JobDir(cfg.paths.job_dir, job_id)
    if jobdir.path.is_dir():
        return jobdir, [("console", jobdir.console_log), ("vmbatch", jobdir.log)]
    keep = cfg.paths.console_log_dir
    kept = keep / f"{jobdir.path.name}.log" if keep is not None else None
    if kept is not None and kept.is_file():
        return jobdir, [("console", kept)]
    raise JobError(
        f"no job {job_id} on this node: no job directory {jobdir.path}",
        hint="`vmbatch ps` lists the jobs here"
        + ("; [paths].console_log_dir keeps no copy of its console" if keep else ""),
    )


#: C0 and C1 control characters but tab: what a guest could print to steer the reader's
#: terminal (ESC sequences: OSC 52 clipboard writes, screen clears, title reports).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters shown as ``^X`` / ``\\xNN``: the console log and
    error messages quoting it are written by the guest, and are read on root's terminal."""
    return _CONTROL.sub(
        lambda m: (
            f"^{chr(ord(m[0]) ^ 0x40)}"
            if ord(m[0]) < 0x20 or m[0] == "\x7f"
            else f"\\x{ord(m[0]):02x}"
        ),
        text,
    )


def tail_lines(path: Path, lines: int) -> tuple[list[str], int]:
    """The last ``lines`` lines of ``path`` and its size (([], 0) if it is missing)."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - TAIL_BYTES))
            data = fh.read(size)
    except FileNotFoundError:
        return [], 0
    text = data.decode(errors="replace").replace("\r", "")
    found = [printable(line) for line in text.split("\n")]
    if found and found[-1] == "":
        found.pop()
    return (found[-lines:] if lines > 0 else []), size


def show_logs(
    cfg: Config,
    job_id: str,
    out: TextIO,
    *,
    lines: int = 50,
    follow: bool = False,
    interval: float = FOLLOW_INTERVAL,
) -> None:
    """Print the last ``lines`` of each log, each line labelled ``[console]`` or
    ``[vmbatch]``, control characters made visible (:func:`printable`); with ``follow``,
    then what is added, until the job directory is gone (the job's VM was torn down), the
    job is kept for inspection (its VM stopped), or Ctrl-C."""
    jobdir, sources = log_sources(cfg, job_id)
    offsets: dict[str, int] = {}
    for label, path in sources:
        found, size = tail_lines(path, lines)
        offsets[label] = size
        for line in found:
            out.write(f"[{label}] {line}\n")
        if not path.exists():
            out.write(f"[{label}] (no {path.name} yet)\n")
    out.flush()
    if not follow or not jobdir.path.is_dir():
        return
    partial = dict.fromkeys(offsets, b"")
    store = StateStore(cfg.batch.state_dir)
    kept = False
    try:
        while jobdir.path.is_dir():
            record = store.read(job_id)
            kept = record is not None and record.phase == KEPT
            for label, path in sources:
                offsets[label], partial[label] = _new_lines(
                    path, offsets[label], partial[label], label, out
                )
            out.flush()
            if kept:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        return
    for label, rest in partial.items():
        if rest:
            out.write(f"[{label}] {printable(rest.decode(errors='replace'))}\n")
    if kept:
        out.write(f"[vmbatch] job {job_id}: ended; its VM is kept for inspection (`vmbatch ps`)\n")
    else:
        out.write(f"[vmbatch] job {job_id}: its VM is gone (job directory removed)\n")
    out.flush()


def _new_lines(
    path: Path, offset: int, partial: bytes, label: str, out: TextIO
) -> tuple[int, bytes]:
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size < offset:  # rolled over or truncated: start again
                offset = 0
            fh.seek(offset)
            data = fh.read(size - offset)
    except FileNotFoundError:
        return 0, partial
    data = partial + data
    *complete, rest = data.split(b"\n")
    for line in complete:
        out.write(f"[{label}] {printable(line.decode(errors='replace').rstrip(chr(13)))}\n")
    return offset + len(data) - len(partial), rest


# -- ssh -----------------------------------------------------------------------------------


def _me() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _owner(path: Path) -> str:
    uid = path.stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _endpoint(cfg: Config, info: dict[str, Any], key: bytes) -> ssh.Endpoint:
    logsetup.secret(key.decode())  # never in a log line, whatever fails next
    return ssh.Endpoint(
        port=int(info["port"]),
        user=str(info["user"]),
        client_key=KeyPair(key.decode(), ""),
        host_key=KeyPair("", str(info["host_key"])),
        host=str(info.get("host") or "127.0.0.1"),
        connect_timeout=cfg.ssh.connect_timeout,
        keepalive_interval=cfg.ssh.keepalive_interval,
    )


def login_for(cfg: Config, job_id: str, *, as_root: bool = False) -> ssh.Endpoint:
    """Where and how the caller logs in to the job's VM: the job's user (its owner, or
    root on the owner's behalf), or with ``as_root`` (root only) root in the guest."""
    if os.geteuid() == 0:
        return _root_login(cfg, job_id, as_root)
    if as_root:
        raise JobError("only root may log in as root in a job's VM (--root)")
    return _owner_login(cfg, job_id)


def _owner_login(cfg: Config, job_id: str) -> ssh.Endpoint:
    userdir = UserDir(cfg.batch.user_dir, job_id)
    try:
        owner = _owner(userdir.path)
    except FileNotFoundError:
        raise JobError(
            f"no VM of job {job_id} on this node (no {userdir.path})",
            hint="is the job running here? `squeue -j JOB -o %N` / `qstat -f JOB` names its"
            " node; its VM may still be booting",
        ) from None
    me = _me()
    if owner != me:
        raise JobError(
            f"job {job_id} belongs to {owner}: only {owner} (and root) may log in to its VM"
        )
    message = userdir.read(UserDir.ERROR)
    if message is not None:
        raise JobError(
            f"job {job_id} has no VM: {message.decode(errors='replace').strip()}",
        )
    info, key = userdir.guest(), userdir.read(UserDir.KEY)
    if info is None or key is None:
        raise JobError(
            f"the VM of job {job_id} is not ready yet ({userdir.path} is incomplete)",
            hint="try again once the job runs",
        )
    port = userdir.read_note().port  # a checkpoint restored the VM on a new port
    return _endpoint(cfg, {**info, "port": port} if port else info, key)


def _root_login(cfg: Config, job_id: str, as_root: bool) -> ssh.Endpoint:
    jobdir = JobDir(cfg.paths.job_dir, job_id)
    record = StateStore(cfg.batch.state_dir).read(job_id)
    if record is not None and record.phase == KEPT and record.kept_as == "disks":
        raise JobError(
            f"job {job_id} is kept as disks only: its VM was destroyed; the disks are in"
            f" {jobdir.path}",
            hint="inspect them with qemu-img or guestfish; `vmbatch cleanup` removes them",
        )
    try:
        info = json.loads(jobdir.login.read_bytes())
        key_file = jobdir.admin_key if as_root else jobdir.user_key
        key = key_file.read_bytes()
    except FileNotFoundError as exc:
        if not jobdir.path.is_dir():
            raise JobError(
                f"no VM of job {job_id} on this node (no {jobdir.path})",
                hint="`vmbatch ps` lists the node's job VMs",
            ) from None
        if as_root and Path(str(exc.filename)) == jobdir.admin_key:
            raise JobError(
                f"the VM of job {job_id} has no login for root: vmbatch authorizes a key"
                " for root in a guest only where [mounts] are configured (to mount them)",
                hint="log in as the job's user (without --root); use sudo there if the"
                " image offers it",
            ) from None
        raise JobError(
            f"the VM of job {job_id} is not ready yet (no {exc.filename})",
            hint="its prologue may still be booting it; `vmbatch ps` shows its phase",
        ) from None
    name = record.domain if record and record.domain else domain_name(job_id)
    with Connection(cfg.libvirt) as conn:
        status = conn.status(name)
    if status is None:
        raise JobError(f"the VM of job {job_id} ({name}) does not run")
    if status.state == "paused":
        kept = " (kept for inspection)" if record and record.phase == KEPT else ""
        raise JobError(
            f"the VM of job {job_id} ({name}) is paused{kept}: it cannot answer",
            hint=f"resume it first: virsh -c {cfg.libvirt.uri} resume {name}",
        )
    endpoint = _endpoint(cfg, info, key)
    return dataclasses.replace(endpoint, user="root") if as_root else endpoint


def _winsize(fd: int) -> tuple[int, int]:
    import fcntl
    import struct

    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return (cols or 80, rows or 24)


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in raw mode (every key goes through), restored after."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_ssh(
    endpoint: ssh.Endpoint,
    argv: tuple[str, ...],
    *,
    stdin_fd: int = 0,
    out: BinaryIO | None = None,
    err: BinaryIO | None = None,
    connect: Callable[[ssh.Endpoint], paramiko.SSHClient] = ssh.connect,
) -> int:
    """A shell (no ``argv``) or ``argv`` in the guest; return its exit status (255 if the
    connection ended without one). With a terminal on ``stdin_fd`` it runs on a
    pseudo-terminal in the guest, as ``ssh -t`` (and the starter's ``srun --pty``) does:
    raw mode here, the window size sent at start and on SIGWINCH. Without one, stdin is
    copied to the command and stdout and stderr come back separately."""
    out = out or sys.stdout.buffer
    err = err or sys.stderr.buffer
    client = connect(endpoint)
    try:
        transport = client.get_transport()
        if transport is None:
            raise GuestConnectionError("the SSH connection to the guest closed at once")
        chan = transport.open_session()
        terminal = os.isatty(stdin_fd)
        if terminal:
            cols, rows = _winsize(stdin_fd)
            chan.get_pty(term=os.environ.get("TERM") or "vt100", width=cols, height=rows)
        if argv:
            chan.exec_command(ssh.remote_command(argv))
        else:
            chan.invoke_shell()
        resized: list[bool] = []
        previous = signal.signal(signal.SIGWINCH, lambda *_: resized.append(True))
        try:
            with _raw(stdin_fd):
                _pump(chan, transport, stdin_fd, out, err, resized)
        finally:
            signal.signal(signal.SIGWINCH, previous)
        status = chan.recv_exit_status() if chan.exit_status_ready() else -1
        chan.close()
    finally:
        client.close()
    return ssh.NO_STATUS if status < 0 else status


def _pump(
    chan: paramiko.Channel,
    transport: paramiko.Transport,
    fd: int,
    out: BinaryIO,
    err: BinaryIO,
    resized: list[bool],
) -> None:
    reading = True
    while True:
        if resized:
            resized.clear()
            with contextlib.suppress(OSError, paramiko.SSHException):
                chan.resize_pty(*_winsize(fd))
        watched: list[Any] = [chan, fd] if reading else [chan]
        try:
            ready, _, _ = select.select(watched, [], [], 0.2)
        except InterruptedError:
            continue
        while chan.recv_ready():
            out.write(chan.recv(65536))
            out.flush()
        while chan.recv_stderr_ready():
            err.write(chan.recv_stderr(65536))
            err.flush()
        if reading and fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if data:
                chan.sendall(data)
            else:
                reading = False
                chan.shutdown_write()
        if chan.recv_ready() or chan.recv_stderr_ready():
            continue
        if chan.exit_status_ready() or chan.closed or not transport.is_active():
            return


# -- console -------------------------------------------------------------------------------


def console(
    cfg: Config,
    job_id: str,
    *,
    force: bool = False,
    stdin_fd: int = 0,
    out_fd: int = 1,
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr),
) -> int:
    """Attach the terminal to the job's serial console until Ctrl-] (or the console ends:
    the VM stopped, another session took it with ``--force``). Returns 0."""
    record = StateStore(cfg.batch.state_dir).read(job_id)
    name = record.domain if record and record.domain else domain_name(job_id)
    with Connection(cfg.libvirt) as conn:
        status = conn.status(name)
        if status is None:
            raise JobError(
                f"no VM of job {job_id} on this node ({name} does not run)",
                hint="`vmbatch ps` lists the node's job VMs; `vmbatch logs` shows a console log",
            )
        stream = conn.open_console(name, lambda data: _write_all(out_fd, data), force=force)
        say(
            f"Connected to the console of job {job_id} ({name}, {status.state})."
            " Escape character is ^] (Ctrl-])."
        )
        ended_by_user = False
        try:
            with _raw(stdin_fd):
                ended_by_user = _console_loop(stream, stdin_fd)
        finally:
            stream.close()
    say(
        ""
        if ended_by_user
        else f"\r\nThe console of job {job_id} closed (its VM stopped, or another session took it)."
    )
    return 0


def _console_loop(stream: Any, fd: int) -> bool:
    """Copy the terminal to the console until Ctrl-] (True) or the console ends (False)."""
    reading = True
    while not stream.ended.is_set():
        if not reading:
            stream.ended.wait(0.2)
            continue
        try:
            ready, _, _ = select.select([fd], [], [], 0.2)
        except InterruptedError:
            continue
        if not ready:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            reading = False  # not a terminal and its input ended: keep showing output
            continue
        before, escape, _ = data.partition(ESCAPE)
        stream.send(before)
        if escape:
            return True
    return False


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data) :]


# -- suspend / resume ------------------------------------------------------------------------


def suspend(cfg: Config, job_id: str) -> str:
    """Pause the running VM of batch job ``job_id`` (``virDomainSuspend``: its vCPUs stop,
    QEMU uses no CPU, its memory stays) for the reason ``operator``, under the job's lock
    (:mod:`vmbatch.pausing`); the message to print. Only a job whose prologue finished
    (phase ``ready``)."""
    store = StateStore(cfg.batch.state_dir)
    with store.exclusive(job_id, wait=5.0):
        record = pausing.ready_record(store, job_id, "paused or continued this way")
        if pausing.OPERATOR in record.pauses:
            return f"job {job_id}: its VM is already paused by an operator"
        with pausing.connection(cfg, record) as conn:
            pausing.add(cfg, store, conn, record, pausing.OPERATOR)
    return f"job {job_id}: VM {record.domain} paused; `vmbatch resume {job_id}` continues it"


def resume(cfg: Config, job_id: str) -> str:
    """Take back an operator's pause (``vmbatch suspend``); the VM continues unless it is
    also paused for another reason (the scheduler suspended the job). The message to print."""
    store = StateStore(cfg.batch.state_dir)
    with store.exclusive(job_id, wait=5.0):
        record = pausing.ready_record(store, job_id, "paused or continued this way")
        if pausing.OPERATOR not in record.pauses:
            why = f" (it is paused by: {', '.join(record.pauses)})" if record.pauses else ""
            return f"job {job_id}: its VM was not paused by `vmbatch suspend`{why}; nothing done"
        since = record.paused_at or time.time()
        with pausing.connection(cfg, record) as conn:
            record = pausing.drop(cfg, store, conn, record, pausing.OPERATOR)
    if record.pauses:
        return (
            f"job {job_id}: operator's pause taken back; VM {record.domain} stays paused"
            f" ({', '.join(record.pauses)})"
        )
    return f"job {job_id}: VM {record.domain} running again after {time.time() - since:.0f}s paused"
