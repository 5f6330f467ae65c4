"""Checkpoints of a batch job's VM on disk: take one, find the newest that verifies, restore it.

A checkpoint is the VM's memory and device state plus copies of the job's disks, in
``[checkpoint].dir/<job>/<generation>/`` (every directory 0700, every file 0600, root's)::

    memory.save     virDomainSaveFlags' file (RAM and device state; libvirt's save format)
    disks/NAME      the job directory's disk files the domain uses (overlay, per-job disks,
                    seed), copied after the save and before any restore
    keys/NAME       the job directory's keys/ (the guest's pinned host key, the job's login)
    manifest.json   written last: job id, generation, image and base image sha256, every
                    file's size and sha256, vmbatch/libvirt/QEMU versions, machine type,
                    time, host, boot id

How libvirt 9.0 constrains it (docs/research/suspend-checkpoint-migrate.md, section 5):

- ``virDomainSaveFlags`` "ends the life of a transient domain"
  (https://libvirt.org/html/libvirt-libvirt-domain.html#virDomainSaveFlags) and managed save
  refuses transient domains, which vmbatch's are. "Checkpoint and continue" is therefore:
  pause (reason ``checkpoint``, :mod:`vmbatch.pausing`; QEMU drains and flushes its disks
  when it stops), save, copy the disks while no QEMU has them open, then
  ``virDomainRestoreFlags`` paused, set the memory limit live again, add the SSH forward
  (runtime ``hostfwd`` rules are not in the saved state: libslirp's ``slirp_state_save``
  keeps only guestfwd sockets), publish the new port in the pause note
  (:attr:`UserDir.paused_note`) and drop the pause.
- The restore's XML is the save file's own (``virDomainSaveImageGetXMLDesc``) without
  ``<memtune>`` and pinned to the job's CPUs now (:func:`vmbatch.libvirt.domain.restore_xml`);
  a VM restored in the job's next run must fit that run's allocation (:func:`fits`).
- A ``--continue`` whose process dies after the restore leaves a paused QEMU without its
  memory limit and SSH forward: the node agent finishes it (:func:`make_whole`).

Crash safety: a checkpoint is written into ``.tmp-<gen>-<pid>/``, each file fsynced, the
manifest last, then renamed to ``<gen>`` and the parent fsynced (rename(2) is atomic); older
generations are removed only after that. A process killed at any point leaves the previous
generation complete and at most a ``.tmp-*`` directory, which :func:`newest_valid` never uses
and removes. If the VM was saved but the checkpoint then fails (a full disk), it is
restored from that save so the job runs on.

The ``requeue`` mark (``<job>/requeue``) says the job runs again: its VM was stopped for a
checkpoint (:func:`take` with ``then="stop"``), or Slurm requeued it (the Epilog compares
restart counts, :func:`vmbatch.hooks.batch.finish`). The epilogue then keeps the
checkpoints for the job's next run, whose prologue restores the newest valid one and clears
the mark; without the mark the epilogue removes them (the job ended for good). The reaper
removes those of jobs that ended while they waited (:func:`vmbatch.reaper.reap`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paramiko

from vmbatch import __version__, faults, pausing, state
from vmbatch.config import Config
from vmbatch.contextualize.keys import KeyPair
from vmbatch.errors import (
    CheckpointError,
    CheckpointRefusedError,
    LibvirtTimeoutError,
    LibvirtUnavailableError,
    VmBatchError,
)
from vmbatch.guest import ssh
from vmbatch.hooks.jobstate import Record, StateStore
from vmbatch.job import JobSpec
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import (
    backing_files,
    machine_type,
    read_files,
    read_size,
    restore_xml,
)
from vmbatch.limits import parse_cpu_list

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MEMORY = "memory.save"
REQUEUE = "requeue"
#: Prefix of a job's checkpoint directory being removed (:func:`discard`).
GONE = ".gone-"
FORMAT = 1
#: ioctl(2) FICLONE (linux/fs.h): the destination shares the source's blocks (btrfs, XFS).
_FICLONE = 0x40049409
_TMP = ".tmp-"

Then = Literal["continue", "stop"]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One complete generation of a job's checkpoint."""

    job_id: str
    generation: int
    path: Path
    manifest: dict[str, Any]

    @property
    def memory(self) -> Path:
        return self.path / MEMORY

    def size(self) -> int:
        """Bytes its files hold (the checkpoint directory's share of the disk, about)."""
        return sum(int(f["size"]) for f in self.manifest.get("files", {}).values())


@dataclass(frozen=True, slots=True)
class Refusal:
    """A candidate that :func:`newest_valid` did not use, and why."""

    path: Path
    reason: str


@dataclass(frozen=True, slots=True)
class Found:
    """What :func:`newest_valid` found: the checkpoint to use (None: none) and every newer
    candidate it refused."""

    checkpoint: Checkpoint | None
    refused: tuple[Refusal, ...] = ()


@dataclass(frozen=True, slots=True)
class Taken:
    """What :func:`take` did."""

    checkpoint: Checkpoint
    seconds: float
    #: The VM's new SSH port after ``then="continue"`` (None: stopped).
    port: int | None


def job_base(cfg: Config, job_id: str) -> Path:
    """The job's checkpoint directory (``[checkpoint].dir/<job>``)."""
    return cfg.checkpoint.dir / state.safe_job_id(job_id)


# -- files -----------------------------------------------------------------------------------


def _mkdir(path: Path) -> None:
    """A root-only directory (0700 from creation: the umask only ever narrows it); its
    missing parents get the usual 0755."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def copy_file(src: Path, dst: Path, mode: int = 0o600) -> None:
    """Copy ``src`` to a new file ``dst`` (created with ``mode``, never through a symlink)
    and fsync it: a reflink (``FICLONE``: shared blocks, O(1)) where the file system has
    them, else the data ranges only (``SEEK_DATA``/``SEEK_HOLE``, lseek(2)), so a sparse
    disk stays sparse."""
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dfd = os.open(
            dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode
        )
        try:
            os.fchmod(dfd, mode)
            try:
                fcntl.ioctl(dfd, _FICLONE, sfd)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                    raise
                _copy_data(sfd, dfd)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _copy_data(sfd: int, dfd: int) -> None:
    size = os.fstat(sfd).st_size
    offset = 0
    while offset < size:
        try:
            start = os.lseek(sfd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = os.lseek(sfd, start, os.SEEK_HOLE)
        pos = start
        while pos < end:
            n = os.copy_file_range(sfd, dfd, min(end - pos, 1 << 30), pos, pos)
            if n == 0:
                break
            pos += n
        offset = end
    os.ftruncate(dfd, size)


# -- taking ----------------------------------------------------------------------------------


def take(cfg: Config, job_id: str, *, then: Then = "continue") -> Taken:
    """Checkpoint the running VM of batch job ``job_id`` (root, under the job's lock).

    ``then="continue"``: the VM runs on from the checkpoint (restored from the save, with a
    new SSH port that the job's starter finds in the pause note). ``then="stop"``: the VM
    stays gone and the job's next run restores it (the ``requeue`` mark keeps the checkpoint
    through the epilogue; the starter exits with ``[batch].requeue_exit``).
    """
    store = StateStore(cfg.batch.state_dir)
    with store.exclusive(job_id, wait=5.0):
        record = pausing.ready_record(store, job_id, "checkpointed")
        with Connection(cfg.libvirt) as conn:
            return _take_locked(cfg, store, conn, record, then)


def _room(cfg: Config, conn: Connection, name: str, disks: list[Path]) -> None:
    """Refuse, before the VM is paused, a checkpoint the checkpoint directory has no room
    for: the guest's memory plus its disks' allocated blocks, with ``[disks].reserve_gib``
    left free (the directory is often on the file system of the job directories)."""
    status = conn.status(name)
    need = (status.memory_mib if status else 0) * 2**20
    need += sum(d.stat().st_blocks * 512 for d in disks if d.exists())
    free = shutil.disk_usage(cfg.checkpoint.dir).free - int(cfg.disks.reserve_gib * 2**30)
    if need > free:
        raise CheckpointError(
            f"no room for a checkpoint in {cfg.checkpoint.dir}: it needs about"
            f" {need / 2**30:.1f} GiB, {max(free, 0) / 2**30:.1f} GiB are free beyond"
            f" [disks].reserve_gib",
            hint="free space there, or point [checkpoint].dir at a larger file system",
        )


def _next_generation(base: Path) -> int:
    numbers = [0]
    for entry in base.iterdir():
        name = entry.name.removeprefix(_TMP).split("-")[0]
        if name.isdigit():
            numbers.append(int(name))
    return max(numbers) + 1


def _take_locked(
    cfg: Config, store: StateStore, conn: Connection, record: Record, then: Then
) -> Taken:
    started = time.monotonic()
    job_id, name = record.job_id, record.domain
    jobdir = state.JobDir(cfg.paths.job_dir, job_id)
    base = job_base(cfg, job_id)
    _mkdir(cfg.checkpoint.dir)
    _mkdir(base)
    if then == "stop":
        # Before the VM is gone: a take killed after the save leaves the job to its requeue.
        mark_requeue(cfg, job_id)
    generation = _next_generation(base)
    tmp = base / f"{_TMP}{generation}-{os.getpid()}"
    final = base / str(generation)
    tmp.mkdir(mode=0o700)
    saved = False
    try:
        xml = conn.xml(name)
        lib_version, qemu_version = conn.version()
        disks = _disk_files(xml, jobdir)
        _room(cfg, conn, name, disks)
        bases = backing_files(xml)
        base_image = bases[0] if bases else ""
        base_sum = sha256(Path(base_image)) if base_image else ""
        record = pausing.add(cfg, store, conn, record, pausing.CHECKPOINT)
        try:
            conn.save(name, tmp / MEMORY, timeout=cfg.checkpoint.timeout)
        except LibvirtTimeoutError as exc:
            # libvirtd may still be saving: abort it and let it settle before anything
            # touches the directory, then go by what happened (the domain gone: saved).
            conn.abort_job(name)
            worker = getattr(exc, "worker", None)
            if worker is not None:
                worker.join(60)
            saved = conn.status(name) is None and (tmp / MEMORY).is_file()
            raise
        saved = True
        (tmp / MEMORY).chmod(0o600)  # libvirt makes it 0600 (in a 0700 directory): make sure
        _fsync(tmp / MEMORY)  # libvirt's iohelper writes it; durable before the manifest
        log.info("VM %s saved to %s", name, tmp / MEMORY)
        files: dict[str, dict[str, Any]] = {MEMORY: _entry(tmp / MEMORY)}
        (tmp / "disks").mkdir(mode=0o700)
        for disk in disks:
            rel = f"disks/{disk.name}"
            copy_file(disk, tmp / rel)
            files[rel] = _entry(tmp / rel)
        if jobdir.keys.is_dir():
            (tmp / "keys").mkdir(mode=0o700)
            for key in sorted(jobdir.keys.iterdir()):
                if key.is_file() and not key.is_symlink():
                    rel = f"keys/{key.name}"
                    copy_file(key, tmp / rel)
                    files[rel] = _entry(tmp / rel)
        faults.point(cfg, "checkpoint.files_written")
        manifest = {
            "format": FORMAT,
            "job_id": job_id,
            # Whose it is: a job id may come back for another user (a scheduler's ids
            # restart), and a restore hands the VM, its keys and memory to the job's user.
            "user": record.user,
            "uid": record.uid,
            "scheduler": record.scheduler,
            "generation": generation,
            "domain": name,
            "jobdir": str(jobdir.path),
            "image": record.image,
            "base_image": {"path": base_image, "sha256": base_sum},
            "files": files,
            "vmbatch_version": __version__,
            "libvirt_version": lib_version,
            "qemu_version": qemu_version,
            "machine": machine_type(xml),
            "memory_limit_mib": record.memory_limit_mib,
            "then": then,
            # Which run of the job it was taken in (Slurm's restart count; None: unknown):
            # a later run may restore it without the requeue mark (a node failure).
            "restarts": record.restarts,
            "time": time.time(),
            "host": socket.gethostname(),
            "boot_id": state.boot_id(),
        }
        _write_new(tmp / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        for directory in (tmp / "disks", tmp / "keys", tmp):
            if directory.is_dir():
                _fsync_dir(directory)
        tmp.rename(final)
        _fsync_dir(base)
    except BaseException as exc:
        _failed(cfg, store, conn, record, base, saved, tmp if tmp.exists() else final, jobdir, exc)
        raise
    checkpoint = Checkpoint(job_id, generation, final, manifest)
    _remove_older(base, generation)
    log.info(
        "checkpoint %d of job %s written to %s (%.0f MiB)",
        generation,
        job_id,
        final,
        checkpoint.size() / 2**20,
    )
    port: int | None = None
    if then == "continue":
        try:
            port = _continue(cfg, store, conn, record, checkpoint, jobdir)
        except VmBatchError as exc:
            # The checkpoint is complete but the VM did not come back: the job goes on
            # from it in its next run, as after --stop.
            mark_requeue(cfg, job_id)
            pausing.tell_starter(cfg, record, True, stopped=True)
            raise CheckpointError(
                f"checkpoint {generation} of job {job_id} is complete, but its VM could not"
                f" run on from it ({exc.message}); the job's next run restores it",
                hint="the job's starter exits for a requeue ([batch].requeue_exit)",
            ) from exc
    else:
        pausing.tell_starter(cfg, record, True, stopped=True)
        log.info("VM %s stopped; the job's next run restores checkpoint %d", name, generation)
    return Taken(checkpoint, time.monotonic() - started, port)


def _failed(
    cfg: Config,
    store: StateStore,
    conn: Connection,
    record: Record,
    base: Path,
    saved: bool,
    tmp: Path,
    jobdir: state.JobDir,
    exc: BaseException,
) -> None:
    """A take that failed: the VM runs on (from its save in ``tmp``, if it was saved: its
    disks in the job directory are unchanged since), the unfinished checkpoint is removed
    and the job is not marked for a requeue. Re-raises a non-vmbatch error as
    CheckpointError."""
    (base / REQUEUE).unlink(missing_ok=True)
    if saved:
        log.error("the checkpoint failed after the VM was saved (%s); running it on", exc)
        try:
            checkpoint = Checkpoint(record.job_id, 0, tmp, {})
            _continue(cfg, store, conn, record, checkpoint, jobdir)
        except VmBatchError as again:
            log.error("could not run the VM on from its save: %s", again)
    elif pausing.CHECKPOINT in record.pauses:
        with contextlib.suppress(VmBatchError):
            pausing.drop(cfg, store, conn, record, pausing.CHECKPOINT)
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(exc, Exception) and not isinstance(exc, VmBatchError):
        raise CheckpointError(
            f"checkpoint of job {record.job_id} failed: {exc}",
            hint="check free space in [checkpoint].dir; the job runs on",
        ) from exc


def _entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _disk_files(xml: str, jobdir: state.JobDir) -> list[Path]:
    """The domain's disk files in its job directory (not the console log, not the base)."""
    found = []
    for name in read_files(xml):
        path = Path(name)
        if path.parent == jobdir.path and path != jobdir.console_log and path.is_file():
            found.append(path)
    return found


def _remove_older(base: Path, generation: int) -> None:
    for entry in base.iterdir():
        if entry.name.isdigit() and int(entry.name) < generation:
            shutil.rmtree(entry, ignore_errors=True)


def _continue(
    cfg: Config,
    store: StateStore,
    conn: Connection,
    record: Record,
    checkpoint: Checkpoint,
    jobdir: state.JobDir,
) -> int:
    """Run the VM on from ``checkpoint``'s save, on the job directory's own disks (pinned
    to the job's CPUs, as the record names them), and make it whole (:func:`make_whole`)."""
    name = record.domain
    cpus = parse_cpu_list(record.cpus) if record.cpus else frozenset()
    conn.restore(
        checkpoint.memory, restore_xml(conn.saved_xml(checkpoint.memory), cpus=cpus),
        timeout=cfg.checkpoint.timeout,
    )  # fmt: skip
    # A new QEMU, paused, without the memory limit and the SSH forward: a process killed
    # from here on leaves it to the agent (Agent._cut_off_checkpoint -> make_whole).
    faults.point(cfg, "checkpoint.restored")
    port = make_whole(cfg, store, conn, record, jobdir)
    log.info("VM %s runs on from checkpoint %d, SSH on port %d", name, checkpoint.generation, port)
    return port


def make_whole(
    cfg: Config,
    store: StateStore,
    conn: Connection,
    record: Record,
    jobdir: state.JobDir | None = None,
) -> int:
    """Give the job's VM, restored from a save by a checkpoint (:func:`_continue`), what
    the save does not hold, and let it run; return its SSH port. Each step may already
    have been done (the agent finishes a checkpoint whose process died somewhere in here):

    - the record's memory hard limit, set live (setting it again is harmless);
    - a loopback forward to the guest's SSH port, unless QEMU already has one (``info
      usernet``): libslirp does not save runtime ``hostfwd`` rules, so a restored QEMU
      starts with none;
    - that port in root's copy of the login (``keys/login.json``, ``vmbatch ssh``) and in
      root's pause note, where the job's starter finds it and reconnects;
    - the ``checkpoint`` pause dropped: the VM continues unless another reason holds it.
    """
    name = record.domain
    jobdir = jobdir or state.JobDir(cfg.paths.job_dir, record.job_id)
    if record.memory_limit_mib:
        conn.limit_memory(name, record.memory_limit_mib)
    port = conn.ssh_port(name, cfg.ssh.port)
    if port is None:
        port = conn.forward_port(name, cfg.ssh.port)
    _update_login(jobdir, port)
    pausing.tell_starter(cfg, record, True, port=port)
    pausing.drop(cfg, store, conn, record, pausing.CHECKPOINT)
    return port


def _update_login(jobdir: state.JobDir, port: int) -> dict[str, Any] | None:
    """Root's copy of the guest's login (``keys/login.json``, ``vmbatch ssh``) with ``port``;
    the login, or None if there is none that can be read."""
    try:
        info = json.loads(jobdir.login.read_bytes())
    except (OSError, ValueError):
        return None
    info["port"] = port
    jobdir.write(jobdir.login, (json.dumps(info, sort_keys=True) + "\n").encode())
    return dict(info)


# -- finding and verifying -------------------------------------------------------------------


def newest_valid(cfg: Config, job_id: str, *, qemu_version: str | None = None) -> Found:
    """The job's newest checkpoint that verifies, and why each newer candidate did not.

    Verified: the manifest (present, readable, this job's), every file's size and sha256
    (a disk modified after the checkpoint was taken differs), the base image's sha256, the
    vmbatch version and the QEMU version (``qemu_version``; None: asked from libvirt).
    Unfinished ``.tmp-*`` directories are never used and are removed (refused as such):
    call it under the job's lock (:meth:`StateStore.exclusive`), which every take holds.
    """
    base = job_base(cfg, job_id)
    if not base.is_dir():
        return Found(None)
    refused: list[Refusal] = []
    generations: list[tuple[int, Path]] = []
    for entry in base.iterdir():
        if entry.name.startswith(_TMP):
            # Callers hold the job's lock, as every take does: no take writes it now.
            refused.append(Refusal(entry, "unfinished (its writer was stopped); removed"))
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.isdigit() and entry.is_dir():
            generations.append((int(entry.name), entry))
    if generations and qemu_version is None:
        with Connection(cfg.libvirt) as conn:
            qemu_version = conn.version()[1]
    for generation, path in sorted(generations, reverse=True):
        reason = verify(path, job_id, generation, qemu_version or "")
        if reason is None:
            return Found(_load(path, job_id, generation), tuple(refused))
        refused.append(Refusal(path, reason))
    return Found(None, tuple(refused))


def _load(path: Path, job_id: str, generation: int) -> Checkpoint:
    return Checkpoint(job_id, generation, path, json.loads((path / MANIFEST).read_bytes()))


def verify(path: Path, job_id: str, generation: int, qemu_version: str) -> str | None:
    """Why the checkpoint in ``path`` must not be restored; None if it verifies."""
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        return "no manifest: the checkpoint was not finished"
    except (OSError, ValueError) as exc:
        return f"its manifest is unreadable ({exc})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return "its manifest is not a checkpoint manifest"
    if manifest.get("job_id") != job_id or manifest.get("generation") != generation:
        return (
            f"its manifest is for job {manifest.get('job_id')!r} generation"
            f" {manifest.get('generation')!r}"
        )
    if manifest.get("vmbatch_version") != __version__:
        return (
            f"taken by vmbatch {manifest.get('vmbatch_version')}, this node runs vmbatch"
            f" {__version__}"
        )
    if manifest.get("qemu_version") != qemu_version:
        return (
            f"taken with QEMU {manifest.get('qemu_version')}, this node has QEMU {qemu_version}:"
            " a saved VM restores only into the same QEMU"
        )
    files = manifest["files"]
    if MEMORY not in files:
        return "its manifest lists no memory state"
    for rel, want in sorted(files.items()):
        file = path / rel
        if ".." in Path(rel).parts or not file.is_file() or file.is_symlink():
            return f"{rel} is missing"
        if file.stat().st_size != want.get("size"):
            return (
                f"{rel} was modified after the checkpoint was taken (size {file.stat().st_size},"
                f" manifest {want.get('size')})"
            )
        if sha256(file) != want.get("sha256"):
            return f"{rel} was modified after the checkpoint was taken (its sha256 differs)"
    image = manifest.get("base_image") or {}
    if image.get("path"):
        base = Path(str(image["path"]))
        if not base.is_file():
            return f"its base image {base} is gone"
        if sha256(base) != image.get("sha256"):
            return f"its base image {base} changed since the checkpoint was taken (sha256 differs)"
    return None


# -- restoring -------------------------------------------------------------------------------


def fits(saved_xml: str, spec: JobSpec) -> None:
    """Refuse (CheckpointRefusedError) a saved VM larger than the job's run now: more
    vCPUs or more memory than ``spec`` gives it (:func:`vmbatch.hooks.batch.job_spec`
    sizes it from the job's allocation on this node). A requeued job may get fewer CPUs
    or less memory than the run it was checkpointed in, and a restored VM keeps its size
    (:func:`vmbatch.libvirt.domain.restore_xml`): it would use more than the scheduler
    gave the job. A smaller VM fits (it uses less than its allocation)."""
    vcpus, memory = read_size(saved_xml)
    want_vcpus = spec.vcpus if spec.vcpus is not None else vcpus
    want_memory = spec.memory if spec.memory is not None else memory
    if vcpus > want_vcpus or memory > want_memory:
        raise CheckpointRefusedError(
            f"its VM has {_vcpus(vcpus)} and {memory} MiB of memory, more than this run of"
            f" the job is given: {_vcpus(want_vcpus)} and {want_memory} MiB (from its"
            " allocation here); a restored VM keeps its size",
            hint="request at least the resources of the run that took the checkpoint",
        )


def _vcpus(n: int) -> str:
    return f"{n} vCPU" if n == 1 else f"{n} vCPUs"


@contextlib.contextmanager
def _as_checkpoint_error(checkpoint: Checkpoint) -> Iterator[None]:
    """A file that cannot be copied or read while restoring: the checkpoint's fault."""
    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {checkpoint.generation} of job {checkpoint.job_id} could not be"
            f" restored: {exc}"
        ) from exc


@contextlib.contextmanager
def _cleanup_on_error(conn: Connection, name: str, jobdir: state.JobDir) -> Iterator[None]:
    try:
        yield
    except BaseException:
        with contextlib.suppress(VmBatchError):
            conn.destroy(name)
        jobdir.remove()
        raise


def restore(
    cfg: Config, checkpoint: Checkpoint, conn: Connection, *, name: str, spec: JobSpec
) -> tuple[ssh.Endpoint, paramiko.SSHClient]:
    """Make the job directory from ``checkpoint`` (disks and keys copied, reflinked where
    possible) and start the saved VM from it, running, with a new SSH forward; wait until
    it answers SSH. Return the job user's endpoint and a logged-in client. On failure the
    domain and the job directory are removed again.

    The job's run now (``spec``, sized from its allocation here) may differ from the one
    the checkpoint was taken in: the saved VM must fit it (:func:`fits`; it cannot shrink:
    libvirt keeps its vCPUs and memory), it is pinned to ``spec.cpus`` (or not pinned),
    not to its old allocation's CPUs, and held to ``spec.memory_limit``."""
    jobdir = state.JobDir(cfg.paths.job_dir, checkpoint.job_id)
    if str(jobdir.path) != checkpoint.manifest.get("jobdir"):
        raise CheckpointRefusedError(
            f"checkpoint {checkpoint.generation} of job {checkpoint.job_id} was taken with its"
            f" disks in {checkpoint.manifest.get('jobdir')}, here they go to {jobdir.path}",
            hint="give every node the same [paths].job_dir",
        )
    try:
        saved = conn.saved_xml(checkpoint.memory)
    except (LibvirtUnavailableError, LibvirtTimeoutError):
        raise
    except VmBatchError as exc:
        raise CheckpointError(
            f"libvirt could not read checkpoint {checkpoint.generation} of job"
            f" {checkpoint.job_id}: {exc.message}"
        ) from exc
    with _as_checkpoint_error(checkpoint):
        fits(saved, spec)
        dxml = restore_xml(saved, cpus=spec.cpus)
    jobdir.create()
    with _cleanup_on_error(conn, name, jobdir), _as_checkpoint_error(checkpoint):
        for rel in checkpoint.manifest["files"]:
            if rel.startswith("disks/"):
                copy_file(checkpoint.path / rel, jobdir.path / Path(rel).name)
            elif rel.startswith("keys/"):
                copy_file(checkpoint.path / rel, jobdir.keys / Path(rel).name)
        try:
            conn.restore(checkpoint.memory, dxml, timeout=cfg.checkpoint.timeout)
        except (LibvirtUnavailableError, LibvirtTimeoutError):
            raise  # the node's fault, not the checkpoint's: the job is requeued, it stays
        except VmBatchError as exc:
            raise CheckpointError(
                f"libvirt could not restore checkpoint {checkpoint.generation} of job"
                f" {checkpoint.job_id}: {exc.message}"
            ) from exc
        if spec.memory_limit:
            conn.limit_memory(name, spec.memory_limit)
        port = conn.forward_port(name, cfg.ssh.port)
        conn.resume(name)
        info = _update_login(jobdir, port)
        if info is None:
            raise ValueError(f"its copy of the guest's login {jobdir.login} is unreadable")
        endpoint = ssh.Endpoint(
            port=port,
            user=str(info["user"]),
            client_key=KeyPair(jobdir.user_key.read_text(), ""),
            host_key=KeyPair("", str(info["host_key"])),
            host=str(info.get("host") or "127.0.0.1"),
            connect_timeout=cfg.ssh.connect_timeout,
            keepalive_interval=cfg.ssh.keepalive_interval,
        )
        client = ssh.wait_for_ssh(
            endpoint,
            cfg.vm.boot_timeout,
            is_alive=lambda: conn.is_running(name),
            console_tail=lambda: "  (restored from a checkpoint)",
        )
    log.info(
        "VM %s restored from checkpoint %d (%s), SSH on port %d",
        name,
        checkpoint.generation,
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(checkpoint.manifest.get("time", 0))),
        port,
    )
    return endpoint, client


# -- the job's end ---------------------------------------------------------------------------


def _newest_manifest(base: Path) -> dict[str, Any] | None:
    """The newest finished generation's manifest in a job's checkpoint directory, read but
    not verified; None if none has one."""
    try:
        names = [p.name for p in base.iterdir() if p.is_dir()]
    except OSError:
        return None
    for generation in sorted((int(n) for n in names if n.isdigit()), reverse=True):
        try:
            manifest = json.loads((base / str(generation) / MANIFEST).read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict):
            return manifest
    return None


def owner(base: Path) -> tuple[str, str] | None:
    """The job id and scheduler a job's checkpoint directory is of (its newest manifest);
    None if no finished checkpoint says."""
    manifest = _newest_manifest(base)
    if manifest is None or not isinstance(manifest.get("job_id"), str):
        return None
    return manifest["job_id"], str(manifest.get("scheduler") or "")


def taken_in(base: Path) -> int | None:
    """The run (Slurm's restart count) the newest checkpoint was taken in; None: unknown."""
    manifest = _newest_manifest(base)
    taken = manifest.get("restarts") if manifest is not None else None
    return taken if isinstance(taken, int) and not isinstance(taken, bool) else None


def requeued(cfg: Config, job_id: str) -> bool:
    """Whether the job's VM was stopped for a checkpoint (the job is being requeued)."""
    return (job_base(cfg, job_id) / REQUEUE).exists()


def mark_requeue(cfg: Config, job_id: str) -> None:
    """Keep the job's checkpoints through its epilogue, for its next run."""
    base = job_base(cfg, job_id)
    _mkdir(cfg.checkpoint.dir)
    _mkdir(base)
    state.atomic_write(base / REQUEUE, b"kept for the job's next run\n")


def clear_requeue(cfg: Config, job_id: str) -> None:
    """The job's next run has begun: its checkpoints no longer outlive its epilogue."""
    (job_base(cfg, job_id) / REQUEUE).unlink(missing_ok=True)


def discard(cfg: Config, job_id: str) -> bool:
    """Remove the job's checkpoints unless it is being requeued to restore one; True if
    removed (or there were none). The directory is first renamed out of the way (atomic: a
    prologue elsewhere sharing the directory finds all of it or nothing), then removed."""
    base = job_base(cfg, job_id)
    if not base.exists():
        return True
    if requeued(cfg, job_id):
        log.info("checkpoints of job %s kept in %s for its next run", job_id, base)
        return False
    gone = base.with_name(f"{GONE}{base.name}-{os.getpid()}")
    try:
        base.rename(gone)
    except OSError as exc:
        log.warning("could not remove the checkpoints of job %s in %s: %s", job_id, base, exc)
        return False
    shutil.rmtree(gone, ignore_errors=True)
    if gone.exists():
        log.warning("could not remove all of job %s's old checkpoints in %s", job_id, gone)
    log.info("checkpoints of job %s removed", job_id)
    return True
