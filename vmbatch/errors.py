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

Each class also says whose fault it is, its :class:`Fault`, which the batch hooks' failure
policy (:mod:`vmbatch.hooks.policy`, docs/admin-guide.md "Failure policy") acts on: the
job's (fail it), transient for this job (requeue it; the node stays up), the image's (fail or
requeue it, and after repeated failures refuse the image on this node for a while), or the
node's (drain/offline it with the cause as the reason). Only node faults take a node out.

::

    VmBatchError
                                    disposition   fault
    ├── ConfigError                 OFFLINE_NODE  node       site config invalid (every problem)
    ├── JobError                    ABORT_JOB     job        the job asked for the impossible
    │   ├── UnknownImageError                                image name not in the catalog
    │   ├── ImageError                            image      image missing, unreadable, not a disk
    │   │   ├── ImageVerifyError                             download fails its checksum / unpack
    │   │   ├── ImageSourceError                             image server refuses it (404, 403)
    │   │   └── ImageCoolOffError                            refused here after repeated failures
    │   └── DiskBudgetError                                  disks outgrew [disks].job_max_gib
    ├── HostError                   REQUEUE       transient  this host could not do it right now
    │   ├── CommandError                                     an external command failed
    │   │   └── CommandTimeoutError                          ... or did not finish in time
    │   ├── PortForwardError                                 no loopback port for the guest's SSH
    │   ├── ImageDownloadError                               fetching failed (.transient: retry)
    │   ├── DiskSpaceError                        node       file system below the reserve
    │   ├── MountError                                       a [mounts] share failed
    │   ├── JobBusyError                                     another hook holds the job's lock
    │   ├── LibvirtError                                     libvirt refused ("host is busy")
    │   │   ├── LibvirtUnavailableError           node       cannot reach libvirtd
    │   │   ├── LibvirtTimeoutError               node       libvirtd did not answer (hung)
    │   │   ├── LibvirtPermissionError ABORT_JOB  job        a non-root caller may not use libvirt
    │   │   └── DomainDefinitionError  OFFLINE_NODE  node    libvirt rejected the domain XML
    │   ├── InjectionToolError         OFFLINE_NODE  node    libguestfs missing or broken
    │   ├── ResourceLimitError         OFFLINE_NODE  node    cannot pin or limit a VM here
    │   ├── MigrationError                                   a live migration failed (VM stays)
    │   │   └── MigrationRefusedError                        ... refused before anything moved
    │   ├── AcceleratorError           OFFLINE_NODE  node    accelerator not usable
    │   └── CheckpointError                                  a checkpoint not taken or restored
    │       └── CheckpointRefusedError                       ... or does not verify
    ├── GuestError                  REQUEUE       transient  the VM did not behave
    │   ├── GuestBootTimeoutError                 image      no SSH within boot_timeout
    │   ├── GuestDiedError                        image      domain ended before we used it
    │   ├── HostKeyMismatchError                  image      guest served another host key
    │   ├── GuestConnectionError                             SSH failed after it was up
    │   └── GuestLostError             ABORT_JOB  job        guest stopped while the job ran
    └── JobInterruptedError         REQUEUE       transient  SIGINT/SIGTERM while working
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


class Fault(enum.Enum):
    """Whose fault a failure is: what the batch hooks' failure policy acts on."""

    JOB = "job"  # the job's own request: fail it, rerunning gives the same
    TRANSIENT = "transient"  # this attempt: requeue the job, the node stays in service
    IMAGE = "image"  # the image: fail or requeue the job; repeated, refuse the image here
    NODE = "node"  # this node: take it out of service with the cause as the reason


class VmBatchError(Exception):
    """Root of every error vmbatch raises on purpose.

    ``str(err)`` is one line a person can act on: what went wrong and how to fix it.
    """

    disposition: Disposition = Disposition.REQUEUE
    fault: Fault = Fault.TRANSIENT

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
    fault = Fault.NODE

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
    fault = Fault.JOB


class UnknownImageError(JobError):
    """The job named an image that is not in the catalog."""


class ImageError(JobError):
    """The image exists in the catalog but cannot be used (missing, unreadable, not an image)."""

    fault = Fault.IMAGE


class ImageVerifyError(ImageError):
    """A downloaded image does not match its catalog checksum, or does not unpack."""


class ImageSourceError(ImageError):
    """The image server answered with a permanent client error (404, 403, 410, ...).

    Requeueing cannot help (every node gets the same answer) and the node is fine for other
    images, so the job is aborted with a message naming the image and the URL to fix.
    """


class ImageCoolOffError(ImageError):
    """The image failed on this node ``[batch].image_failures`` times within
    ``[batch].image_failure_window``: it is refused here until its cool-off ends."""


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

    fault = Fault.NODE


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

    fault = Fault.NODE


class LibvirtTimeoutError(LibvirtError):
    """libvirtd did not answer within the configured timeout: it is probably hung."""

    fault = Fault.NODE

    #: The thread still blocked in the libvirt call (it cannot be cancelled).
    worker: threading.Thread | None = None


class LibvirtPermissionError(LibvirtError):
    """A non-root caller (``vmbatch ps`` by a user) may not use libvirt at the configured
    URI: the socket's permissions or libvirt's access control (polkit) refuse them. Not
    retried: asking again gives the same answer. Raised only for callers other than root
    (for root the same failure is a broken node: :class:`LibvirtUnavailableError`)."""

    disposition = Disposition.ABORT_JOB
    fault = Fault.JOB


class DomainDefinitionError(LibvirtError):
    """libvirt rejected the domain definition: a site configuration or vmbatch problem."""

    disposition = Disposition.OFFLINE_NODE
    fault = Fault.NODE


class InjectionToolError(HostError):
    """libguestfs, needed for offline injection, is missing or cannot start on this node."""

    disposition = Disposition.OFFLINE_NODE
    fault = Fault.NODE


class ResourceLimitError(HostError):
    """The node cannot hold a VM to its allocation as configured ([limits]): libvirt has
    no memory cgroup, or the scheduler's CPUs are not this host's."""

    disposition = Disposition.OFFLINE_NODE
    fault = Fault.NODE


class MigrationError(HostError):
    """A live migration (:mod:`vmbatch.migrate`) failed; the VM runs on at the source."""


class MigrationRefusedError(MigrationError):
    """A live migration was refused before anything moved: the domain is not running, or
    the destination lacks what the VM needs (the identical base image, kernel, QEMU build)."""


class AcceleratorError(HostError):
    """The configured accelerator cannot be used on this host."""

    disposition = Disposition.OFFLINE_NODE
    fault = Fault.NODE


class CheckpointError(HostError):
    """A checkpoint of a job's VM could not be taken or restored (:mod:`vmbatch.checkpoint`);
    a job whose checkpoint failed after its VM was saved runs on from that save."""


class CheckpointRefusedError(CheckpointError):
    """A job's newest checkpoint does not verify (a file changed after it was taken, the
    base image or the vmbatch/QEMU version differs); the message says why. With
    ``[checkpoint].on_bad = "hold"`` the job is held with it."""


class GuestError(VmBatchError):
    """The VM did not behave as expected."""

    disposition = Disposition.REQUEUE


class GuestBootTimeoutError(GuestError):
    """The guest did not answer SSH within ``boot_timeout``."""

    fault = Fault.IMAGE


class GuestDiedError(GuestError):
    """The domain ended before or while vmbatch was using it."""

    fault = Fault.IMAGE


class HostKeyMismatchError(GuestError):
    """The guest served an SSH host key other than the pinned per-job key."""

    fault = Fault.IMAGE


class GuestConnectionError(GuestError):
    """The SSH connection to a guest that had answered failed."""


class GuestLostError(GuestError):
    """The guest stopped (crash, poweroff) while the job ran: the job failed; not requeued,
    because it may have done part of its work (and a job that powers the VM off would loop)."""

    disposition = Disposition.ABORT_JOB
    fault = Fault.JOB


class JobInterruptedError(VmBatchError):
    """vmbatch was told to stop (SIGINT/SIGTERM) before the job finished."""

    disposition = Disposition.REQUEUE

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
