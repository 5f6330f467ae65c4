"""Per-job state of the batch hooks: what the prologue made, and the job user's share of it.

Two places, with different owners:

``[batch].state_dir/<job>.json`` (directory root-only, 0700)
    The :class:`Record` of one job: domain name, job directory, image, who, when, how far
    the prologue got and why it failed. Written *before* anything is created and again at
    each step, atomically (temp file, fsync, rename, fsync of the directory), so after a
    crash at any point the epilogue or ``vmbatch cleanup`` finds a complete record of an
    earlier step. The domain name and the job directory follow from the job id alone, so
    even a missing record leaves nothing unfindable.

``[batch].user_dir/<job>/`` (owned by the job's user, 0700; parent root-owned 0755)
    What the job starter, running as the job's user, needs and nothing more: the per-job
    SSH private key (``id_ed25519``), ``guest.json`` (port and the guest's pinned host
    key) or, if the prologue failed for a reason other than the node's, ``error`` (the
    message for the job's stderr) and ``status`` (the starter's exit status, which the
    failure policy chose: fail, requeue or hold the job). The job starter adds ``started``
    (or ``not-started``) for the accounting line. Files are made by root with
    ``O_EXCL|O_NOFOLLOW`` in a directory that is handed to the user only at the end (chown
    last), so no user can redirect root's writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import glob
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbatch.errors import HostError, JobBusyError
from vmbatch.retry import STATE_LOCK_POLICY
from vmbatch.state import atomic_write, safe_job_id

log = logging.getLogger(__name__)

#: Prologue steps recorded in :attr:`Record.phase`; ``kept``: the job ended and failed,
#: and its epilogue kept its VM (or its disks) for inspection until ``kept_until``.
PREPARING, READY, FAILED, KEPT = "preparing", "ready", "failed", "kept"


@dataclass(frozen=True, slots=True)
class Record:
    """One job's state record (JSON on disk; unknown keys from newer versions are ignored)."""

    job_id: str
    scheduler: str
    user: str
    uid: int = -1
    gid: int = -1
    phase: str = PREPARING
    image: str = ""
    #: A cached image file marked in use by this job (released by the epilogue).
    image_path: str | None = None
    domain: str = ""
    jobdir: str = ""
    boot_id: str = ""
    prologue_pid: int = 0
    started: float = 0.0
    boot_seconds: float | None = None
    #: Why the prologue failed: the message and the disposition's value.
    error: str | None = None
    cause: str | None = None
    #: The epilogue wrote the job's accounting line (a rerun after a crash writes none).
    accounted: bool = False
    #: Host CPUs the VM is pinned to (a CPU list; None: not pinned) and its memory hard
    #: limit in MiB (None: none), for the accounting line.
    cpus: str | None = None
    memory_limit_mib: int | None = None
    #: The job's ``#VMBATCH keep=`` request where the site honours it: "yes", "no" or "".
    keep: str = ""
    #: Kept jobs: how ("paused" or "disks") and until when (epoch seconds).
    kept_as: str | None = None
    kept_until: float | None = None
    #: Why the job's running VM is paused (:mod:`vmbatch.pausing`: ``operator``,
    #: ``scheduler``, ``checkpoint``); it runs again only when no reason is left. And since
    #: when (epoch seconds; None while it runs).
    pauses: tuple[str, ...] = ()
    paused_at: float | None = None
    #: ``vmbatch migrate`` moved the running VM: the destination libvirtd's URI and the
    #: job's directory there (teardown destroys the domain and removes the files there).
    migrated_to: str = ""
    migrated_dir: str = ""
    #: The relay ``vmbatch agent`` runs for a migrated job (:mod:`vmbatch.relay`): the
    #: starter's loopback port here (``relay_port``; 0: none), forwarded to ``relay_to``
    #: ("host:port"), connecting from inside the network namespace ``relay_netns`` (a
    #: path; "": this node's) whose inode is ``relay_netns_ino``.
    relay_port: int = 0
    relay_to: str = ""
    relay_netns: str = ""
    relay_netns_ino: int = 0
    #: Slurm: how often the job had run before this run (the Prolog's
    #: ``SLURM_JOB_RESTART_COUNT``); the Epilog compares it with slurmctld's count to tell a
    #: requeue (whose next run restores the job's checkpoint). None: not known (Torque).
    restarts: int | None = None

    def to_json(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Record:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        if "paused_by" in raw and "pauses" not in raw:  # written by vmbatch before 0.18
            raw["pauses"] = [raw["paused_by"]] if raw["paused_by"] else []
        if isinstance(raw.get("pauses"), list):
            raw["pauses"] = tuple(str(r) for r in raw["pauses"])
        return cls(**{k: v for k, v in raw.items() if k in names})


class StateStore:
    """The root-only directory of job records."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _ensure(self) -> None:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise HostError(
                f"cannot create the state directory {self.dir}: {exc.strerror}",
                hint="check [batch].state_dir and that the hook runs as root",
            ) from exc

    def path(self, job_id: str) -> Path:
        return self.dir / f"{safe_job_id(job_id)}.json"

    def write(self, record: Record) -> Record:
        self._ensure()
        try:
            atomic_write(self.path(record.job_id), record.to_json())
        except OSError as exc:
            raise HostError(
                f"cannot write the state of job {record.job_id} in {self.dir}: {exc.strerror}",
                hint="check free space and [batch].state_dir",
            ) from exc
        return record

    def read(self, job_id: str) -> Record | None:
        """The job's record; None if there is none (or it is unreadable: logged)."""
        try:
            return Record.from_json(self.path(job_id).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("state of job %s unreadable (%s); using the job id alone", job_id, exc)
            return None

    def remove(self, job_id: str) -> None:
        """Drop the record (call under :meth:`exclusive`, which then drops its lock file),
        and any temporary file of a write that was killed half-way (:func:`atomic_write`)."""
        path = self.path(job_id)
        path.unlink(missing_ok=True)
        for tmp in self.dir.glob(f".{glob.escape(path.name)}.*.tmp"):
            tmp.unlink(missing_ok=True)

    def records(self) -> list[Record]:
        """Every readable record (for ``vmbatch cleanup``)."""
        if not self.dir.is_dir():
            return []
        found = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                found.append(Record.from_json(path.read_bytes()))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("state file %s unreadable: %s", path, exc)
        return found

    @contextlib.contextmanager
    def exclusive(self, job_id: str, *, wait: float = 1.0) -> Iterator[None]:
        """Hold the job's lock, waiting up to ``wait`` seconds; raise JobBusyError if another
        hook (prologue, epilogue, ``vmbatch cleanup``) holds it longer.

        A ``flock`` is released by the kernel when its holder dies, so a crashed hook never
        blocks the next one. The lock file is removed by the holder when the block ends
        (the job is finished or the next hook will recreate it); a waiter that then gets
        the lock on the unlinked file sees that its inode is no longer the path's and tries
        again, so two hooks never hold "the" lock at once.
        """
        self._ensure()
        lock = self.path(job_id).with_suffix(".lock")
        fd = -1
        try:
            for attempt in STATE_LOCK_POLICY.retrying(max_delay=wait):
                with attempt:
                    fd = _lock(lock)
        except JobBusyError as exc:
            raise JobBusyError(
                f"another vmbatch hook is working on job {job_id} ({exc.message})",
                hint="a prologue still booting, or a concurrent epilogue or cleanup",
            ) from exc
        try:
            yield
        finally:
            if not self.path(job_id).exists():
                lock.unlink(missing_ok=True)  # still ours: nobody else can hold it now
            os.close(fd)


def _lock(lock: Path) -> int:
    """Open and flock ``lock`` without waiting; the fd, or JobBusyError (retried)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise JobBusyError("its lock is held") from exc
        try:
            current = lock.lstat()
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is None or (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
            raise JobBusyError("its lock file was replaced while waiting")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True, slots=True)
class PauseNote:
    """Root's pause note for the job starter (:attr:`UserDir.paused_note`)."""

    paused: bool = False
    pauses: int = 0
    #: The VM's SSH port on 127.0.0.1 since a checkpoint restored it (None: guest.json's).
    port: int | None = None
    #: A checkpoint stopped the VM (``vmbatch checkpoint --stop``): its next run restores it.
    stopped: bool = False


class UserDir:
    """The job user's directory ``[batch].user_dir/<job>/``."""

    KEY = "id_ed25519"
    GUEST = "guest.json"
    ERROR = "error"
    #: The job starter's exit status after a failed prologue (with ``error``).
    STATUS = "status"
    #: Written by the job starter (the user): the time the guest started the job's script,
    #: or why it could not; for the accounting line only (:mod:`vmbatch.hooks.accounting`).
    STARTED = "started"
    NOT_STARTED = "not-started"

    def __init__(self, base: Path, job_id: str) -> None:
        self.base = base
        self.path = base / safe_job_id(job_id)

    def create(self, uid: int, gid: int, files: dict[str, bytes]) -> None:
        """(Re)create the directory with ``files`` (mode 0600), then hand it to uid:gid."""
        if not self.remove():
            raise HostError(
                f"cannot replace {self.path}, left by an earlier run of this job id",
                hint="remove it by hand (check for mounts in it)",
            )
        try:
            self.base.mkdir(mode=0o755, parents=True, exist_ok=True)
            self.path.mkdir(mode=0o700)
            for name, data in files.items():
                fd = os.open(
                    self.path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
                )
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    os.fchown(fh.fileno(), uid, gid)
            os.chown(self.path, uid, gid)
        except OSError as exc:
            raise HostError(
                f"cannot create the job's directory {self.path}: {exc.strerror}",
                hint="check [batch].user_dir (a local file system, root-owned parent)",
            ) from exc

    @property
    def paused_note(self) -> Path:
        """``<user_dir>/.paused/<job>``: root's note (0644, in root's 0755 directory, which
        the user cannot change) of whether the job's VM is paused and how often it was, so
        that the job starter counts no paused time against its own timeouts; after a
        checkpoint (:mod:`vmbatch.checkpoint`) also the VM's new SSH port (``port``: a
        restored VM's forward is a new one) and whether the VM was stopped for a requeue
        (``stopped``)."""
        return self.base / ".paused" / self.path.name

    def write_paused(
        self, paused: bool, pauses: int, *, port: int | None = None, stopped: bool = False
    ) -> None:
        """Root: record the VM's pause state (atomically: the starter never reads half).
        A port written before is kept unless ``port`` replaces it."""
        note = self.paused_note
        note.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        port = port if port is not None else self.read_note().port
        raw: dict[str, Any] = {"paused": paused, "pauses": pauses}
        if port is not None:
            raw["port"] = port
        if stopped:
            raw["stopped"] = True
        atomic_write(note, json.dumps(raw).encode() + b"\n", mode=0o644)

    def read_paused(self) -> tuple[bool, int]:
        """(paused now and to run again, how many pauses so far); (False, 0) without a
        note. A VM a checkpoint stopped (``stopped``) is not waited for: its job ends here
        and continues in its next run."""
        note = self.read_note()
        return note.paused and not note.stopped, note.pauses

    def read_note(self) -> PauseNote:
        """The whole pause note; an empty one if there is none (or it is unreadable)."""
        try:
            fd = os.open(self.paused_note, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return PauseNote()
        try:
            with os.fdopen(fd, "rb") as fh:
                raw = json.loads(fh.read(4096))
            port = raw.get("port")
            return PauseNote(
                paused=bool(raw["paused"]),
                pauses=int(raw["pauses"]),
                port=port if isinstance(port, int) and 0 < port < 65536 else None,
                stopped=raw.get("stopped") is True,
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return PauseNote()

    def remove(self) -> bool:
        """Remove the directory; False (logged) if something the user put there prevents it.

        The user owns it and may have mounted something inside (``fusermount`` is setuid):
        mounts under it are detached first (``umount2(MNT_DETACH | UMOUNT_NOFOLLOW)``, which
        never waits for the file system's server). ``shutil.rmtree`` works through file
        descriptors (``rmtree.avoids_symlink_attacks``), so a symlink swapped in meanwhile
        is removed, never followed.
        """
        with contextlib.suppress(FileNotFoundError):
            self.paused_note.unlink()
        if not (self.path.exists() or self.path.is_symlink()):
            return True
        detach_mounts(self.path)
        shutil.rmtree(self.path, ignore_errors=True)
        if self.path.exists() or self.path.is_symlink():
            log.warning(
                "could not remove the job's directory %s (the user may have put something"
                " there that root cannot remove); remove it by hand",
                self.path,
            )
            return False
        return True

    def read(self, name: str) -> bytes | None:
        """A file of the directory, never through a symlink (read as the job's user)."""
        try:
            fd = os.open(self.path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as fh:
            return fh.read(1 << 20)

    def guest(self) -> dict[str, Any] | None:
        data = self.read(self.GUEST)
        if data is None:
            return None
        value = json.loads(data)
        return value if isinstance(value, dict) else None


#: umount2(2) flags: detach lazily, and never follow a symlink at the target.
_MNT_DETACH, _UMOUNT_NOFOLLOW = 2, 8


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path`` (``/proc/self/mountinfo``, proc(5)), deepest first."""
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        # Octal escapes for space, tab, newline and backslash (proc(5), show_mountinfo).
        point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
        if point == path or path in point.parents:
            found.append(point)
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def detach_mounts(path: Path) -> None:
    """Lazily unmount everything mounted at or below ``path`` (root only; logged)."""
    points = mounts_under(path)
    if not points:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for point in points:
        if libc.umount2(os.fsencode(point), _MNT_DETACH | _UMOUNT_NOFOLLOW) != 0:
            err = ctypes.get_errno()
            log.warning("could not detach the mount at %s: %s", point, os.strerror(err))
        else:
            log.warning("detached a mount a job's user made at %s", point)
