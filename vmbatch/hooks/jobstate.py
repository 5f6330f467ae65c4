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
    key) or, if the prologue failed because of the job, ``error`` (the message for the
    job's stderr). Files are made by root with ``O_EXCL|O_NOFOLLOW`` in a directory that is
    handed to the user only at the end (chown last), so no user can redirect root's writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbatch.errors import HostError, JobError
from vmbatch.state import atomic_write, safe_job_id

log = logging.getLogger(__name__)

#: Prologue steps recorded in :attr:`Record.phase`.
PREPARING, READY, FAILED = "preparing", "ready", "failed"


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

    def to_json(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Record:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
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
        self.path(job_id).unlink(missing_ok=True)
        self.path(job_id).with_suffix(".lock").unlink(missing_ok=True)

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
    def exclusive(self, job_id: str) -> Iterator[None]:
        """Hold the job's lock; a second prologue for the same job id is refused at once.

        A ``flock`` is released by the kernel when its holder dies, so a crashed prologue
        never blocks the next one.
        """
        self._ensure()
        lock = self.path(job_id).with_suffix(".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise JobError(
                    f"another vmbatch prologue for job {job_id} is running; this one did nothing",
                    hint="the scheduler started the prologue twice for one job id",
                ) from exc
            yield
        finally:
            os.close(fd)


class UserDir:
    """The job user's directory ``[batch].user_dir/<job>/``."""

    KEY = "id_ed25519"
    GUEST = "guest.json"
    ERROR = "error"

    def __init__(self, base: Path, job_id: str) -> None:
        self.base = base
        self.path = base / safe_job_id(job_id)

    def create(self, uid: int, gid: int, files: dict[str, bytes]) -> None:
        """(Re)create the directory with ``files`` (mode 0600), then hand it to uid:gid."""
        self.remove()
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

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self.path.exists() or self.path.is_symlink():
            raise HostError(
                f"could not remove {self.path}", hint="remove it by hand and check its owner"
            )

    def read(self, name: str) -> bytes | None:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None

    def guest(self) -> dict[str, Any] | None:
        data = self.read(self.GUEST)
        if data is None:
            return None
        value = json.loads(data)
        return value if isinstance(value, dict) else None
