"""A job's disks on the host: the overlay on the base image, the empty extra disks, and the
free-space guard that runs before any of them is created.

- The overlay: ``qemu-img create -f qcow2 -F <fmt> -b <base> <overlay>`` writes only qcow2
  metadata, so the time does not grow with the base image's size, and the guest's writes land
  in the overlay: the base image is never written.
- The CernVM-FS cache disk and the scratch disk: empty qcow2 files of the configured virtual
  size. qcow2 allocates clusters on first write, so creating one is instant and costs a few
  hundred KiB whatever its size. µCernVM needs such an empty disk and formats it itself on
  first boot ("this hard disk is initially empty and can be created instantaneously",
  CernVM 3 release notes, github.com/cernvm/doc-cernvm RELEASE.md).
- The guard: a job starts only if ``[paths].job_dir`` and ``[paths].cache_dir`` each keep
  ``[disks].reserve_gib`` free; otherwise :class:`~vmbatch.errors.DiskSpaceError` requeues
  it (the node is short of space, not the job at fault).

- The budget: :class:`DiskBudget` sums the host space the job's disk files take
  (``st_blocks``, what the file system really gave them) against ``[disks].job_max_gib``.
  The job starter and ``vmbatch run`` check it every second while the job runs
  (:class:`~vmbatch.guest.session.Session` ``watch``) and end a job over it, so one runaway
  job cannot take the job directory's file system from the node's other VMs. ``stat``
  needs only search permission on the job directory (0711), so the starter can check as the
  job's user.

All of them live in the job directory and go with it at teardown, and are created private
(0600, root): qemu-img runs with umask 077. The job directory is 0711 and its file names and
job ids are predictable, and qemu-img creates its file with mode 0644 less the umask (QEMU
``block/file-posix.c``, ``raw_co_create``), so with the prologue's umask 022 a ``chmod``
after the command would come too late: a local user looping on ``open()`` would get a read
handle on the guest's disk in between and keep it for the VM's life. libvirt still reads
the files: it opens them as root before re-owning them for QEMU's user, as for the seed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vmbatch import faults, process
from vmbatch.config import Config
from vmbatch.errors import DiskBudgetError, DiskSpaceError, HostError
from vmbatch.images.cache import free_bytes
from vmbatch.images.catalog import ImageSpec
from vmbatch.libvirt.domain import DiskSpec
from vmbatch.state import JobDir

log = logging.getLogger(__name__)

#: The mask qemu-img runs with: what it creates is 0600 from the start (see the module doc).
PRIVATE_UMASK = 0o077

#: Serials of the extra disks, as the guest sees them (``/dev/disk/by-id/virtio-<serial>``).
CVMFS_SERIAL = "vmbatch-cvmfs"
SCRATCH_SERIAL = "vmbatch-scratch"


def check_free_space(cfg: Config) -> None:
    """Raise DiskSpaceError if the job or cache directory is below the reserve."""
    reserve = cfg.disks.reserve_gib * 2**30
    for what, path in (("job_dir", cfg.paths.job_dir), ("cache_dir", cfg.paths.cache_dir)):
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent  # not created yet: the file system it will be on
        free = free_bytes(probe)
        if free < reserve:
            raise DiskSpaceError(
                f"only {free / 2**30:.1f} GiB free in {path} ([paths].{what}), less than the"
                f" {cfg.disks.reserve_gib:g} GiB reserve ([disks].reserve_gib)",
                hint="free space there; the job is requeued",
            )


def create_overlay(cfg: Config, image: ImageSpec, dest: Path) -> Path:
    """Create ``dest`` as a qcow2 overlay on ``image`` (mode 0600; libvirt re-owns it)."""
    argv = ["create", "-q", "-f", "qcow2", "-F", image.format, "-b", str(image.path)]
    return _qemu_img_create(cfg, [*argv, str(dest)], dest)


def create_blank(cfg: Config, dest: Path, size_gib: float) -> Path:
    """Create ``dest`` as an empty, sparse qcow2 disk of ``size_gib`` (rounded to MiB)."""
    mib = max(1, round(size_gib * 1024))
    return _qemu_img_create(cfg, ["create", "-q", "-f", "qcow2", str(dest), f"{mib}M"], dest)


def _qemu_img_create(cfg: Config, args: list[str], dest: Path) -> Path:
    """Run ``qemu-img ARGS`` with :data:`PRIVATE_UMASK`; check that ``dest`` came out private.

    The check catches a ``[tools].qemu_img`` wrapper that resets the umask or chmods: the
    file is then removed (a handle someone may have opened no longer reaches the guest's
    disk) and the job requeued, rather than run on a disk others can read.
    """
    process.run(
        [str(cfg.tools.qemu_img), *args], timeout=cfg.tools.command_timeout, umask=PRIVATE_UMASK
    )
    mode = dest.stat().st_mode & 0o7777
    if mode & 0o077:
        dest.unlink(missing_ok=True)
        raise HostError(
            f"{cfg.tools.qemu_img} created {dest} with mode {mode:04o}, readable by others",
            hint="[tools].qemu_img must keep the umask it is started with (077)",
        )
    return dest


def job_disks(cfg: Config, image: ImageSpec, jobdir: JobDir) -> tuple[DiskSpec, ...]:
    """Create the job's overlay and extra disks in ``jobdir``; return them in guest order:
    root (vda), then the CernVM-FS cache disk, then the scratch disk, each if configured."""
    disks = [DiskSpec(create_overlay(cfg, image, jobdir.overlay), "qcow2")]
    faults.point(cfg, "disks.overlay_created")
    for size, path, serial in (
        (image.cvmfs_cache_gib, jobdir.cvmfs_cache, CVMFS_SERIAL),
        (image.scratch_gib, jobdir.scratch, SCRATCH_SERIAL),
    ):
        if size > 0:
            disks.append(DiskSpec(create_blank(cfg, path, size), "qcow2", serial=serial))
    return tuple(disks)


class DiskBudget:
    """``[disks].job_max_gib`` for one job: call it to raise DiskBudgetError once over."""

    def __init__(self, cfg: Config, jobdir: JobDir) -> None:
        self.limit = int(cfg.disks.job_max_gib * 2**30)
        self.files = (jobdir.overlay, jobdir.cvmfs_cache, jobdir.scratch)
        self._blind = False

    def used(self) -> int:
        """Bytes the job's disk files take on the host (sparse: only what was written)."""
        total = 0
        for path in self.files:
            try:
                total += path.stat().st_blocks * 512
            except FileNotFoundError:
                continue
        return total

    def __call__(self) -> None:
        if self.limit <= 0 or self._blind:
            return
        try:
            used = self.used()
        except OSError as exc:  # e.g. a job_dir the job's user cannot search: say so once
            log.warning(
                "cannot watch the job's disk use (%s); [disks].job_max_gib not enforced", exc
            )
            self._blind = True
            return
        if used > self.limit:
            raise DiskBudgetError(
                f"the job wrote {used / 2**30:.2f} GiB to its VM's disks, more than the"
                f" {self.limit / 2**30:g} GiB a job may take on this node"
                " ([disks].job_max_gib); the job was ended",
                hint="write large output to a shared file system, or ask the site's admins",
            )
