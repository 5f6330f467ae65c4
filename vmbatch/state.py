"""The per-job directory on the host: what one job's VM is made of, and nothing else.

Layout (``[paths].job_dir/<job>/``, mode 0711 so QEMU, running as an unprivileged user, can
reach the files libvirt hands it but cannot list the directory)::

    overlay.qcow2   the job's copy-on-write disk on top of the base image
    cvmfs-cache.qcow2, scratch.qcow2
                    the job's empty extra disks, if configured ([disks])
    seed.iso        the contextualization volume
    console.log     the guest's serial console (written by virtlogd)
    vmbatch.log     root's hooks' log lines of this job (root only, 0600), for ``vmbatch logs``
    keys/           0700: the guest's login for root's ``vmbatch ssh``: ``login.json`` (port,
                    user, pinned host key), the job user's key ``id_ed25519`` and, with
                    ``[mounts]``, root's key in the guest ``admin_ed25519``
    owner           ``vmbatch run`` only: the process that owns the VM (:func:`process_identity`),
                    so that ``vmbatch cleanup --stale`` can reap the VM once it is gone

Every file is written atomically (temp file, fsync, rename) so a crash never leaves a
half-written file that a later clean-up would misread.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from vmbatch.errors import HostError

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This host boot's random id (proc(5)): tells state from before a reboot apart."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


def process_identity(pid: int) -> str | None:
    """``PID:START:BOOT`` of a live process (START: field 22 of proc/PID/stat, its start time
    in clock ticks since boot), which no later process can share: a reused PID has another
    start time, a reboot another boot id. None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) is in parentheses and may contain anything: count from its end.
    fields = stat[stat.rindex(")") + 2 :].split()
    return f"{pid}:{fields[19]}:{boot_id()}"


def is_alive(identity: str) -> bool:
    """True while the process named by :func:`process_identity` still runs."""
    pid, _, _ = identity.partition(":")
    return pid.isdigit() and process_identity(int(pid)) == identity


def safe_job_id(job_id: str) -> str:
    """A job id usable as a single path component (scheduler ids may contain anything)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", job_id).lstrip(".")
    return cleaned[:100] or "job"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` (whatever the umask): a temp file
    beside it, fsync, rename over ``path``, fsync of the directory. A crash leaves the old
    file or the new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class JobDir:
    """One job's directory under ``[paths].job_dir``."""

    def __init__(self, base: Path, job_id: str) -> None:
        self.path = base / safe_job_id(job_id)

    @property
    def overlay(self) -> Path:
        return self.path / "overlay.qcow2"

    @property
    def cvmfs_cache(self) -> Path:
        return self.path / "cvmfs-cache.qcow2"

    @property
    def scratch(self) -> Path:
        return self.path / "scratch.qcow2"

    @property
    def seed(self) -> Path:
        return self.path / "seed.iso"

    @property
    def context_iso(self) -> Path:
        return self.path / "context.iso"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def log(self) -> Path:
        return self.path / "vmbatch.log"

    @property
    def keys(self) -> Path:
        return self.path / "keys"

    @property
    def login(self) -> Path:
        return self.keys / "login.json"

    @property
    def user_key(self) -> Path:
        return self.keys / "id_ed25519"

    @property
    def admin_key(self) -> Path:
        return self.keys / "admin_ed25519"

    @property
    def owner(self) -> Path:
        return self.path / "owner"

    def create(self) -> JobDir:
        """Create the directory; it must not exist yet (one job, one directory)."""
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            self.path.mkdir(mode=0o711)
            # mkdir's mode is filtered by the umask. 0711: QEMU (another user) must reach
            # the files libvirt hands it, but not list the directory.
            self.path.chmod(0o711)
            self.keys.mkdir(mode=0o700)
        except FileExistsError as exc:
            raise HostError(
                f"job directory {self.path} already exists",
                hint="another run uses this job id, or `vmbatch cleanup` has not run yet",
            ) from exc
        except OSError as exc:
            raise HostError(
                f"cannot create job directory {self.path}: {exc.strerror}",
                hint="check [paths].job_dir and free space (`vmbatch doctor`)",
            ) from exc
        return self

    def write(self, path: Path, data: bytes, mode: int = 0o600) -> Path:
        """Atomically write ``data`` to ``path`` inside this directory with ``mode``."""
        if self.path not in path.parents:
            raise ValueError(f"{path} is outside {self.path}")
        atomic_write(path, data, mode)
        return path

    def remove(self) -> None:
        """Delete the directory and everything in it; a missing directory is fine."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.path.exists():
            raise HostError(
                f"could not remove job directory {self.path}",
                hint="remove it by hand; check for immutable files or a full disk",
            )
