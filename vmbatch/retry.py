"""Named retry policies: the only place vmbatch decides what to retry, how often, how long.

Every policy has an explicit stop condition, an explicit wait, and re-raises the last error
(``reraise=True``) so callers see our own exception, not ``tenacity.RetryError``. Each retry
is logged with the policy name, attempt number and cause. Waits whose deadline depends on the
job (the boot timeout) take it as an argument to :meth:`RetryPolicy.retrying`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import tenacity

from vmbatch.errors import (
    GuestConnectionError,
    ImageDownloadError,
    JobBusyError,
    LibvirtError,
    LibvirtTimeoutError,
    LibvirtUnavailableError,
    MountError,
)

log = logging.getLogger(__name__)


def is_transient(exc: BaseException) -> bool:
    """A HostError marked as one failed attempt worth repeating."""
    return getattr(exc, "transient", False) is True


class GuestNotReady(Exception):  # noqa: N818 - a polling signal, not an error users see
    """Raised inside the SSH wait loop while the guest does not answer yet."""


class LockBusy(Exception):  # noqa: N818 - a polling signal, not an error users see
    """Raised inside a lock wait while another process holds the lock."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A named retry policy. ``max_delay`` or ``max_attempts`` (or both) bound it."""

    name: str
    retry_on: tuple[type[BaseException], ...]
    wait_seconds: float
    wait_max: float | None = None
    max_attempts: int | None = None
    max_delay: float | None = None
    #: Optional finer test on an exception of a ``retry_on`` type (e.g. only transient ones).
    retry_if: Callable[[BaseException], bool] | None = None
    #: Polls (waiting for something to appear) log at DEBUG: one line per 0.1 s poll would
    #: drown the log. Real retries of a failed operation log at WARNING.
    log_level: int = logging.WARNING

    def retrying(self, *, max_delay: float | None = None) -> tenacity.Retrying:
        """A fresh ``tenacity.Retrying`` for one use of this policy."""
        delay = max_delay if max_delay is not None else self.max_delay
        stops: list[tenacity.stop.stop_base] = []
        if self.max_attempts is not None:
            stops.append(tenacity.stop_after_attempt(self.max_attempts))
        if delay is not None:
            stops.append(tenacity.stop_after_delay(delay))
        if not stops:
            raise ValueError(f"retry policy {self.name} has no stop condition")
        stop = stops[0]
        for s in stops[1:]:
            stop = stop | s
        wait: tenacity.wait.wait_base
        if self.wait_max is None:
            wait = tenacity.wait_fixed(self.wait_seconds)
        else:
            wait = tenacity.wait_exponential(multiplier=self.wait_seconds, max=self.wait_max)
        return tenacity.Retrying(
            stop=stop,
            wait=wait,
            retry=tenacity.retry_if_exception(self._should_retry),
            reraise=True,
            before_sleep=self._log,
        )

    def _should_retry(self, exc: BaseException) -> bool:
        if not isinstance(exc, self.retry_on):
            return False
        return self.retry_if is None or self.retry_if(exc)

    def _log(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.log(
            self.log_level,
            "%s: attempt %d failed (%s), retrying",
            self.name,
            state.attempt_number,
            exc,
        )


#: Waiting for the guest's SSH server: poll for the banner every 0.1 s (the user-mode network
#: accepts connections before the guest listens, see docs/platform.md) until ``boot_timeout``.
SSH_READY_POLICY = RetryPolicy(
    name="SshReadyPolicy",
    retry_on=(GuestNotReady,),
    wait_seconds=0.1,
    max_delay=180.0,
    log_level=logging.DEBUG,
)

#: An SSH handshake or authentication that fails after the banner appeared (sshd restarting
#: during cloud-init, keys not yet installed): a few real retries.
SSH_CONNECT_POLICY = RetryPolicy(
    name="SshConnectPolicy",
    retry_on=(GuestConnectionError,),
    wait_seconds=0.5,
    wait_max=4.0,
    max_attempts=8,
    max_delay=60.0,
)

#: Opening the libvirt connection: libvirtd may be restarting (socket briefly missing).
LIBVIRT_CONNECT_POLICY = RetryPolicy(
    name="LibvirtConnectPolicy",
    retry_on=(LibvirtUnavailableError,),
    wait_seconds=1.0,
    wait_max=4.0,
    max_attempts=3,
    # The last failure is the error a person reads; each retry is an INFO line (the hooks'
    # log has it; a terminal shows it with -v), not a warning repeating the same cause.
    log_level=logging.INFO,
)

#: Starting a domain that libvirt refused as "resource busy" (VIR_ERR_RESOURCE_BUSY: the
#: host is busy); any other refusal is final. createXML starts nothing when it fails.
LIBVIRT_CREATE_POLICY = RetryPolicy(
    name="LibvirtCreatePolicy",
    retry_on=(LibvirtError,),
    retry_if=is_transient,
    wait_seconds=1.0,
    wait_max=4.0,
    max_attempts=4,
    max_delay=30.0,
)

#: Image downloads: connection errors, read stalls and 5xx answers, resumed each time.
DOWNLOAD_POLICY = RetryPolicy(
    name="DownloadPolicy",
    retry_on=(ImageDownloadError,),
    retry_if=is_transient,
    wait_seconds=0.5,
    wait_max=8.0,
    max_attempts=6,
)

#: Logging in again after the connection to a running job's guest dropped: the job goes on
#: in the guest, so keep trying (backing off to 10 s) until ``[ssh].reconnect_timeout`` or
#: Torque precancel's ``[batch].precancel_timeout`` (the caller's ``max_delay``). An attempt
#: checks that the domain still runs, logs in, and resumes the step; a login on a closed
#: connection, or a step that drops before the guest answered, fails the attempt.
SSH_RECONNECT_POLICY = RetryPolicy(
    name="SshReconnectPolicy",
    retry_on=(GuestConnectionError,),
    wait_seconds=0.5,
    wait_max=10.0,
    max_delay=600.0,
)

#: Mounting a shared filesystem in the guest (``mount -o retry=0``, one attempt at a time):
#: back off from 1 s to 8 s until the mount's ``timeout`` (the caller's ``max_delay``).
NFS_MOUNT_POLICY = RetryPolicy(
    name="NfsMountPolicy",
    retry_on=(MountError,),
    retry_if=is_transient,
    wait_seconds=1.0,
    wait_max=8.0,
    max_delay=120.0,
)

#: Destroying a VM while libvirtd is dead or hangs: each attempt on a fresh connection, backing
#: off to 10 s, until ``[libvirt].teardown_timeout`` (the caller's ``max_delay``).
LIBVIRT_TEARDOWN_POLICY = RetryPolicy(
    name="LibvirtTeardownPolicy",
    retry_on=(LibvirtUnavailableError, LibvirtTimeoutError),
    wait_seconds=1.0,
    wait_max=10.0,
    max_delay=120.0,
)

#: Waiting for another hook's hold on a job's state lock (a prologue still booting when the
#: epilogue comes); the wait is the caller's ``max_delay``, a few attempts when it is short.
STATE_LOCK_POLICY = RetryPolicy(
    name="StateLockPolicy",
    retry_on=(JobBusyError,),
    wait_seconds=0.2,
    wait_max=2.0,
    max_delay=1.0,
)

#: Waiting for libvirtd to answer after vmbatch restarted it: poll (each probe bounded by
#: ``[libvirt].timeout``) until ``[libvirt].restart_wait`` (the caller's ``max_delay``).
LIBVIRTD_READY_POLICY = RetryPolicy(
    name="LibvirtdReadyPolicy",
    retry_on=(LibvirtUnavailableError, LibvirtTimeoutError),
    wait_seconds=0.5,
    wait_max=2.0,
    max_delay=60.0,
    log_level=logging.DEBUG,
)

#: Waiting for another hook that is restarting libvirtd (it holds the restart lock) for
#: as long as a restart may take (the caller's ``max_delay``).
LIBVIRTD_RESTART_LOCK_POLICY = RetryPolicy(
    name="LibvirtdRestartLockPolicy",
    retry_on=(LockBusy,),
    wait_seconds=0.2,
    max_delay=150.0,
    log_level=logging.DEBUG,
)

ALL_POLICIES = (
    SSH_READY_POLICY,
    SSH_CONNECT_POLICY,
    SSH_RECONNECT_POLICY,
    LIBVIRT_CONNECT_POLICY,
    LIBVIRT_CREATE_POLICY,
    DOWNLOAD_POLICY,
    NFS_MOUNT_POLICY,
    STATE_LOCK_POLICY,
    LIBVIRT_TEARDOWN_POLICY,
    LIBVIRTD_READY_POLICY,
    LIBVIRTD_RESTART_LOCK_POLICY,
)
