"""The one vmbatch exception tree.

Every error vmbatch raises on purpose is a :class:`VmBatchError`. Each class carries a
:class:`Disposition` that says what the batch system should do with the job:

``REQUEUE``
    transient, not the job's fault: the host is busy, libvirtd restarted, a guest did not
    come up in time. Run the job again (elsewhere or later).
``ABORT_JOB``
    the job's own fault: unknown image, bad option. Running it again gives the same result.
``OFFLINE_NODE``
    this node is broken and needs an admin: bad site configuration, libvirtd dead, disk full.

One table, :mod:`vmbatch.hooks.exitcodes`, turns dispositions into exit codes. Entry points
catch ``VmBatchError`` in exactly one place each.

::

    VmBatchError
    ├── ConfigError                 OFFLINE_NODE  site config invalid (lists every problem)
    ├── JobError                    ABORT_JOB     the job asked for something impossible
    │   ├── UnknownImageError                     image name not in the catalog
    │   ├── ImageError                            image missing, unreadable, not a disk image
    │   ├── ImageVerifyError                      download fails its checksum / will not unpack
    │   ├── ImageSourceError                      the image server refuses it (404, 403, ...)
    │   └── DiskBudgetError                       the job's disks outgrew [disks].job_max_gib
    ├── HostError                   REQUEUE       this host could not do it right now
    │   ├── CommandError                          an external command failed
    │   │   └── CommandTimeoutError               ... or did not finish in time
    │   ├── PortForwardError                      no loopback port for the guest's SSH
    │   ├── ImageDownloadError                    fetching an image failed (.transient: retry)
    │   ├── DiskSpaceError                        job or cache file system below the reserve
    │   ├── MountError                            a [mounts] share failed (.transient: retry)
    │   ├── JobBusyError                          another hook holds the job's state lock
    │   ├── LibvirtError                          libvirt refused an operation
    │   │   ├── LibvirtUnavailableError           cannot reach libvirtd
    │   │   ├── LibvirtTimeoutError               libvirtd did not answer in time (hung)
    │   │   └── DomainDefinitionError  OFFLINE_NODE  libvirt rejected the domain XML
    │   └── AcceleratorError                      requested accelerator not usable
    ├── GuestError                  REQUEUE       the VM did not behave
    │   ├── GuestBootTimeoutError                 no SSH within boot_timeout
    │   ├── GuestDiedError                        domain ended before/while we used it
    │   ├── HostKeyMismatchError                  guest served a key other than the pinned one
    │   └── GuestConnectionError                  SSH failed after it was up
    └── JobInterruptedError         REQUEUE       SIGINT/SIGTERM while preparing or running
"""

from __future__ import annotations

import enum
import signal
import threading


class Disposition(enum.Enum):
    """What the batch system should do with the job after an error."""

    REQUEUE = "requeue"
    ABORT_JOB = "abort_job"
    OFFLINE_NODE = "offline_node"


class VmBatchError(Exception):
    """Root of every error vmbatch raises on purpose.

    ``str(err)`` is one line a person can act on: what went wrong and how to fix it.
    """

    disposition: Disposition = Disposition.REQUEUE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class ConfigError(VmBatchError):
    """The site configuration is invalid; ``problems`` lists every problem found."""

    disposition = Disposition.OFFLINE_NODE

    def __init__(self, problems: list[str], *, source: str = "configuration") -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = f"{source}: {self.problems[0]}"
        else:
            text = f"{source}: {len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(text)


class JobError(VmBatchError):
    """The job asked for something that cannot work; rerunning it would fail again."""

    disposition = Disposition.ABORT_JOB


class UnknownImageError(JobError):
    """The job named an image that is not in the catalog."""


class ImageError(JobError):
    """The image exists in the catalog but cannot be used (missing, unreadable, not an image)."""


class ImageVerifyError(ImageError):
    """A downloaded image does not match its catalog checksum, or does not unpack."""


class ImageSourceError(ImageError):
    """The image server answered with a permanent client error (404, 403, 410, ...).

    Requeueing cannot help (every node gets the same answer) and the node is fine for other
    images, so the job is aborted with a message naming the image and the URL to fix.
    """


class DiskBudgetError(JobError):
    """The job's disks took more host space than ``[disks].job_max_gib``: the job was ended
    so that the job directory's file system stays for the node's other jobs."""


class HostError(VmBatchError):
    """This host could not do it right now; another try (or another node) may work.

    ``transient`` marks one failed attempt that a retry policy may repeat (see
    ``retry.is_transient``); the error that ends the retries is not transient.
    """

    disposition = Disposition.REQUEUE

    def __init__(self, message: str, *, hint: str | None = None, transient: bool = False) -> None:
        super().__init__(message, hint=hint)
        self.transient = transient


class CommandError(HostError):
    """An external command failed."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        super().__init__(message, hint=hint)
        self.returncode = returncode
        self.stderr = stderr


class CommandTimeoutError(CommandError):
    """An external command did not finish within its timeout and was killed."""


class ImageDownloadError(HostError):
    """Fetching an image failed. ``transient`` errors (connection, 5xx, stall) are retried."""


class DiskSpaceError(HostError):
    """A file system vmbatch writes to has less free space than ``[disks].reserve_gib``."""


class MountError(HostError):
    """A shared filesystem (``[mounts.NAME]``) could not be mounted in the guest within its
    budget: the server or the node's network is at fault, not the job, so it is requeued.
    ``transient`` marks one failed attempt (retried); the final error is not transient."""


class JobBusyError(HostError):
    """Another hook (a prologue still booting, a concurrent epilogue or ``vmbatch cleanup``)
    holds the job's state lock."""


class PortForwardError(HostError):
    """No loopback port could be forwarded to the guest's SSH server."""


class LibvirtError(HostError):
    """libvirt refused an operation."""


class LibvirtUnavailableError(LibvirtError):
    """libvirtd cannot be reached (not running, socket missing, connection lost)."""


class LibvirtTimeoutError(LibvirtError):
    """libvirtd did not answer within the configured timeout: it is probably hung."""

    #: The thread still blocked in the libvirt call (it cannot be cancelled).
    worker: threading.Thread | None = None


class DomainDefinitionError(LibvirtError):
    """libvirt rejected the domain definition: a site configuration or vmbatch problem."""

    disposition = Disposition.OFFLINE_NODE


class InjectionToolError(HostError):
    """libguestfs, needed for offline injection, is missing or cannot start on this node."""

    disposition = Disposition.OFFLINE_NODE


class AcceleratorError(HostError):
    """The configured accelerator cannot be used on this host."""

    disposition = Disposition.OFFLINE_NODE


class GuestError(VmBatchError):
    """The VM did not behave as expected."""

    disposition = Disposition.REQUEUE


class GuestBootTimeoutError(GuestError):
    """The guest did not answer SSH within ``boot_timeout``."""


class GuestDiedError(GuestError):
    """The domain ended before or while vmbatch was using it."""


class HostKeyMismatchError(GuestError):
    """The guest served an SSH host key other than the pinned per-job key."""


class GuestConnectionError(GuestError):
    """The SSH connection to a guest that had answered failed."""


class GuestLostError(GuestError):
    """The guest stopped (crash, poweroff) while the job ran: the job failed; not requeued,
    because it may have done part of its work (and a job that powers the VM off would loop)."""

    disposition = Disposition.ABORT_JOB


class JobInterruptedError(VmBatchError):
    """vmbatch was told to stop (SIGINT/SIGTERM) before the job finished."""

    disposition = Disposition.REQUEUE

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
