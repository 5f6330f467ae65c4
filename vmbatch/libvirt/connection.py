"""The only module that talks to libvirt.

- A silent error handler is registered once, so libvirt does not print to stderr behind our
  back; errors arrive as ``libvirtError`` and are mapped here, by named ``VIR_ERR_*``
  constants, into the vmbatch tree.
- The default event loop runs in a daemon thread so keepalive works: a dead libvirtd is
  noticed within ``keepalive_interval * (keepalive_count + 1)`` seconds.
- Every call is bounded by ``[libvirt].timeout``: it runs in a daemon thread, and if libvirtd
  does not answer in time we raise :class:`LibvirtTimeoutError` and leave the stuck thread
  behind (it cannot be cancelled; it dies with the process). A hung libvirtd therefore cannot
  hang a hook.
- Domains are transient (``createXML``): after a crash nothing stays defined.

Tests inject a connection to libvirt's test driver (``test:///abs/path/node.xml``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import libvirt_qemu

from vmbatch.config import LibvirtConfig
from vmbatch.errors import (
    DomainDefinitionError,
    LibvirtError,
    LibvirtPermissionError,
    LibvirtTimeoutError,
    LibvirtUnavailableError,
    PortForwardError,
    ResourceLimitError,
    VmBatchError,
)
from vmbatch.libvirt.domain import (
    DOMAIN_PREFIX,
    NETDEV_ID,
    JobMetadata,
    read_files,
    read_metadata,
)
from vmbatch.retry import LIBVIRT_CONNECT_POLICY, LIBVIRT_CREATE_POLICY

log = logging.getLogger(__name__)

T = TypeVar("T")

_EVENT_LOOP_LOCK = threading.Lock()
_event_loop_started = False

_UNAVAILABLE = frozenset(
    {
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_AUTH_FAILED,
    }
)
_DEFINITION = frozenset(
    {
        libvirt.VIR_ERR_XML_ERROR,
        libvirt.VIR_ERR_XML_DETAIL,
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
        libvirt.VIR_ERR_XML_INVALID_SCHEMA,
    }
)
_HINT_UNAVAILABLE = "is libvirtd running? start it, or check [libvirt].uri; `vmbatch doctor` helps"
#: libvirt's answers to a client it will not serve: authentication or access control
#: (polkit) refused it, or polkit could not be asked (no D-Bus system bus).
_DENIED = frozenset(
    {
        libvirt.VIR_ERR_AUTH_FAILED,
        libvirt.VIR_ERR_AUTH_UNAVAILABLE,
        libvirt.VIR_ERR_AUTH_CANCELLED,
        libvirt.VIR_ERR_ACCESS_DENIED,
        libvirt.VIR_ERR_OPERATION_DENIED,
    }
)
_DENIED_FROM = frozenset({libvirt.VIR_FROM_POLKIT, libvirt.VIR_FROM_DBUS, libvirt.VIR_FROM_ACCESS})
#: The local sockets of ``qemu:///system`` (monolithic libvirtd, or the modular virtqemud).
SYSTEM_SOCKETS = (
    "/run/libvirt/libvirt-sock",
    "/run/libvirt/libvirt-sock-ro",
    "/run/libvirt/virtqemud-sock",
    "/run/libvirt/virtqemud-sock-ro",
)
#: libvirt's domain states (virDomainState) as ``virsh domstate`` names them.
_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


class DomainNotFound(LibvirtError):  # noqa: N818 - an expected outcome, used internally
    """The domain does not exist (any more)."""


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """A running vmbatch domain, as libvirt reports it."""

    name: str
    metadata: JobMetadata | None
    #: Host files its XML names (disk sources, console log): whose job directory it uses.
    files: tuple[str, ...] = ()
    #: ``kvm`` or ``tcg``: the accelerator, from the domain type (``kvm`` / ``qemu``).
    accel: str = ""


@dataclass(frozen=True, slots=True)
class DomainStatus:
    """What ``virDomainGetInfo`` says of a domain now."""

    #: ``running``, ``paused``, ... (virsh's names of virDomainState).
    state: str
    vcpus: int
    memory_mib: int


def denied(exc: libvirt.libvirtError) -> bool:
    """Whether libvirt refused the caller rather than failed: authentication or access
    control said no (polkit's ``org.libvirt.unix.monitor`` / ``.manage`` actions,
    https://libvirt.org/aclpolkit.html), polkit could not be asked, or the socket's
    permissions kept the caller out (``connect(2)``: EACCES)."""
    if exc.get_error_code() in _DENIED or exc.get_error_domain() in _DENIED_FROM:
        return True
    return "Permission denied" in (exc.get_error_message() or "")


def socket_refused(uri: str, *, read_only: bool = False) -> str | None:
    """The first local socket of ``qemu:///system`` (its read-only one with ``read_only``)
    that exists but that this process may not connect to (connecting to a Unix socket needs
    write permission on it, unix(7)); None if none."""
    if not uri.startswith("qemu:///system"):
        return None
    for path in SYSTEM_SOCKETS:
        if path.endswith("-ro") != read_only:
            continue
        if Path(path).exists() and not os.access(path, os.W_OK):
            return path
    return None


def _silent(_ctx: object, _err: object) -> None:
    """libvirt's default handler prints every error to stderr; we report them ourselves."""


def _ensure_event_loop() -> None:
    global _event_loop_started
    with _EVENT_LOOP_LOCK:
        if _event_loop_started:
            return
        libvirt.registerErrorHandler(_silent, None)
        libvirt.virEventRegisterDefaultImpl()

        def loop() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def map_error(exc: libvirt.libvirtError, what: str) -> LibvirtError:
    """Translate a ``libvirtError`` into our tree (by named constants, never numbers)."""
    code = exc.get_error_code()
    msg = exc.get_error_message() or str(exc)
    text = f"libvirt could not {what}: {msg}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFound(text)
    rpc = exc.get_error_domain() == libvirt.VIR_FROM_RPC
    if code in _UNAVAILABLE or (code == libvirt.VIR_ERR_SYSTEM_ERROR and rpc):
        return LibvirtUnavailableError(text, hint=_HINT_UNAVAILABLE)
    if rpc:
        # The RPC layer failed on an open connection (e.g. "client socket is closed" once
        # keepalive gave up on a hung libvirtd): the connection is gone, not the domain.
        return LibvirtUnavailableError(
            f"lost the connection to libvirtd while trying to {what}: {msg}",
            hint="libvirtd died or hangs; it was not the job's fault",
        )
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return LibvirtTimeoutError(text, hint="libvirtd is overloaded or hung")
    if code in _DEFINITION:
        return DomainDefinitionError(
            text, hint="check the image entry and [vm] settings with `vmbatch config check`"
        )
    if code == libvirt.VIR_ERR_RESOURCE_BUSY:
        # "resource busy" (the host or a device is busy): worth another try shortly.
        return LibvirtError(text, hint="the host is busy; retried", transient=True)
    return LibvirtError(text)


class Connection:
    """A libvirt connection whose every call is bounded by a timeout."""

    def __init__(self, cfg: LibvirtConfig, *, read_only: bool = False) -> None:
        """``read_only``: a read-only connection (``virConnectOpenReadOnly``: listing and
        reading domains, nothing else), which libvirt's default polkit policy grants every
        local user (https://libvirt.org/aclpolkit.html, "Special actions")."""
        self.cfg = cfg
        self.read_only = read_only
        self._conn: Any = None
        #: createXML calls that timed out but may still succeed inside libvirtd.
        self._pending_creates: dict[str, threading.Thread] = {}

    # -- plumbing -------------------------------------------------------------------------

    def _bounded(
        self, what: str, fn: Callable[..., T], *args: Any, timeout: float | None = None
    ) -> T:
        """Run ``fn(*args)`` in a daemon thread; give up after ``timeout`` seconds
        (``[libvirt].timeout`` unless given)."""
        limit = self.cfg.timeout if timeout is None else timeout
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                box["error"] = exc

        worker = threading.Thread(target=target, name=f"libvirt: {what}", daemon=True)
        worker.start()
        worker.join(limit)
        if worker.is_alive():
            exc = LibvirtTimeoutError(
                f"libvirt did not {what} within {limit:.0f}s",
                hint="libvirtd looks hung: check it with `vmbatch doctor` and restart it",
            )
            exc.worker = worker
            raise exc
        if "error" in box:
            err = box["error"]
            if isinstance(err, libvirt.libvirtError):
                raise map_error(err, what) from err
            raise err
        return box["value"]  # type: ignore[no-any-return]

    def open(self) -> Connection:
        """Open the configured URI (retried briefly: libvirtd may be restarting)."""
        _ensure_event_loop()
        for attempt in LIBVIRT_CONNECT_POLICY.retrying():
            with attempt:
                self._conn = self._open_once()
        return self

    def _open_once(self) -> Any:
        opener = libvirt.openReadOnly if self.read_only else libvirt.open
        try:
            conn = self._bounded(f"connect to {self.cfg.uri}", opener, self.cfg.uri)
        except LibvirtTimeoutError:
            raise
        except LibvirtError as exc:
            if os.geteuid() != 0:
                self._refused(exc)
            if isinstance(exc, LibvirtUnavailableError):
                raise
            # Any other failure to open (bad URI, permissions) means libvirt is unusable.
            raise LibvirtUnavailableError(exc.message, hint=_HINT_UNAVAILABLE) from exc
        if self.cfg.keepalive_interval > 0 and not self.cfg.uri.startswith("test:"):
            self._bounded(
                "set keepalive",
                conn.setKeepAlive,
                self.cfg.keepalive_interval,
                self.cfg.keepalive_count,
            )
        return conn

    def _refused(self, exc: LibvirtError) -> None:
        """Raise LibvirtPermissionError if libvirt refused this (non-root) caller: asking
        again would not help, and "is libvirtd running?" would send them the wrong way."""
        cause = exc.__cause__
        sock = socket_refused(self.cfg.uri, read_only=self.read_only)
        if not (isinstance(cause, libvirt.libvirtError) and denied(cause)) and sock is None:
            return
        user = _user_name()
        access = "read-only " if self.read_only else ""
        why = f"{sock} is not open to {user}" if sock else exc.message
        raise LibvirtPermissionError(
            f"user {user} may not use libvirt at {self.cfg.uri}: {why}",
            hint=f"run the command as root, or give {user} {access}access to"
            f" {self.cfg.uri}: a polkit rule allowing the action"
            f" org.libvirt.unix.{'monitor' if self.read_only else 'manage'}"
            " (https://libvirt.org/aclpolkit.html), or membership of the group that owns"
            " libvirt's socket (unix_sock_group and unix_sock_ro_perms / unix_sock_rw_perms"
            " in libvirtd.conf)",
        ) from exc

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                self._bounded("close the connection", conn.close)
            except LibvirtError as exc:
                log.debug("closing libvirt connection: %s", exc)

    def __enter__(self) -> Connection:
        return self.open() if self._conn is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def raw(self) -> Any:
        if self._conn is None:
            raise LibvirtUnavailableError("not connected to libvirt", hint=_HINT_UNAVAILABLE)
        return self._conn

    def _lookup(self, name: str) -> Any:
        return self._bounded(f"find domain {name}", self.raw.lookupByName, name)

    # -- operations -----------------------------------------------------------------------

    def ping(self) -> None:
        """One round trip to libvirtd that touches no hypervisor (``virConnectGetLibVersion``;
        the hypervisor's version may probe QEMU, which takes seconds on some hosts)."""
        self._bounded("answer", self.raw.getLibVersion)

    def version(self) -> tuple[str, str]:
        """(libvirt library version, hypervisor version) as dotted strings."""
        lib = self._bounded("read the libvirt version", self.raw.getLibVersion)
        hv = self._bounded("read the hypervisor version", self.raw.getVersion)
        return _dotted(lib), _dotted(hv)

    def create(self, name: str, xml: str, *, memory_limit_mib: int | None = None) -> None:
        """Start the transient domain ``name`` from ``xml``.

        With ``memory_limit_mib`` the domain starts paused, gets that hard limit on its
        memory cgroup (``virDomainSetMemoryParameters`` ``hard_limit``, live) and only then
        runs: no guest instruction executes before the limit holds. Not ``<memtune>`` in
        the XML: libvirt then also raises QEMU's ``RLIMIT_MEMLOCK`` to the limit
        (``qemuDomainGetMemLockLimitBytes``, libvirt 9.0), which needs CAP_SYS_RESOURCE
        and failed here ("cannot limit locked memory of process ...: Operation not
        permitted"); the live setting changes the cgroup alone. If the limit cannot be set
        the domain is destroyed and :class:`ResourceLimitError` raised.

        If libvirtd does not answer in time the call may still succeed later inside
        libvirtd; :meth:`destroy` then waits for it once more before deciding the domain
        is gone, so a slow start cannot leak a running VM.
        """
        flags = libvirt.VIR_DOMAIN_START_PAUSED if memory_limit_mib else 0
        try:
            # A "busy" refusal started nothing (createXML is all or nothing): try again.
            for attempt in LIBVIRT_CREATE_POLICY.retrying():
                with attempt:
                    self._bounded(f"start domain {name}", self.raw.createXML, xml, flags)
        except LibvirtTimeoutError as exc:
            if exc.worker is not None:
                self._pending_creates[name] = exc.worker
            raise
        if memory_limit_mib:
            self._limit_and_resume(name, memory_limit_mib)

    def _limit_and_resume(self, name: str, limit_mib: int) -> None:
        self.limit_memory(name, limit_mib)
        self._bounded(f"resume domain {name}", self._lookup(name).resume)

    def limit_memory(self, name: str, limit_mib: int) -> None:
        """Set the domain's memory hard limit live (see :meth:`create`); if libvirt cannot,
        destroy the domain and raise :class:`ResourceLimitError`."""
        try:
            self.set_memory_limit(name, limit_mib)
        except (LibvirtTimeoutError, LibvirtUnavailableError):
            raise
        except LibvirtError as exc:
            self.destroy(name)
            cause = exc.__cause__
            why = cause.get_error_message() if isinstance(cause, libvirt.libvirtError) else exc
            raise ResourceLimitError(
                f"libvirt cannot hold VM {name} to {limit_mib} MiB of memory: {why}",
                hint="libvirt needs the cgroup memory controller for [limits].memory_limit;"
                " give it one, or set memory_limit = false",
            ) from exc

    def save(self, name: str, path: Path, *, timeout: float) -> None:
        """Save the domain's memory and device state to ``path`` (``virDomainSaveFlags``;
        https://libvirt.org/html/libvirt-libvirt-domain.html#virDomainSaveFlags). This
        "ends the life of a transient domain": the domain is gone afterwards. Its disks are
        the caller's business (QEMU flushed them when the domain was paused)."""
        dom = self._lookup(name)
        self._bounded(f"save domain {name}", dom.saveFlags, str(path), None, 0, timeout=timeout)

    def saved_xml(self, path: Path) -> str:
        """The domain XML inside a save file (``virDomainSaveImageGetXMLDesc``, with
        security-sensitive parts, which only a read-write connection gets)."""
        flags = libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE
        return str(
            self._bounded("read a save file's XML", self.raw.saveImageGetXMLDesc, str(path), flags)
        )

    def restore(self, path: Path, xml: str, *, timeout: float) -> None:
        """Start the domain saved in ``path`` again, paused (``virDomainRestoreFlags`` with
        ``VIR_DOMAIN_SAVE_PAUSED``), with ``xml`` (:func:`vmbatch.libvirt.domain.restore_xml`)
        as its definition; the caller sets what the save file lacks (the memory limit, the
        SSH forward) and then resumes it."""
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED
        self._bounded(
            "restore a saved domain", self.raw.restoreFlags, str(path), xml, flags, timeout=timeout
        )

    def is_running(self, name: str) -> bool:
        """True while the domain exists and runs (transient domains vanish when stopped)."""
        try:
            dom = self._lookup(name)
            return bool(self._bounded(f"query domain {name}", dom.isActive))
        except DomainNotFound:
            return False

    def destroy(self, name: str) -> bool:
        """Hard-stop the domain. Returns False if it was already gone (that counts as done)."""
        pending = self._pending_creates.pop(name, None)
        if pending is not None:
            log.warning(
                "waiting up to %.0fs for the slow start of %s to end", self.cfg.timeout, name
            )
            pending.join(self.cfg.timeout)
            if pending.is_alive():
                log.error("libvirtd is still starting %s; `vmbatch cleanup` must reap it", name)
        try:
            dom = self._lookup(name)
            self._bounded(f"destroy domain {name}", dom.destroy)
        except DomainNotFound:
            return False
        except LibvirtError as exc:
            # "domain is not running" after it stopped between lookup and destroy: done.
            cause = exc.__cause__
            if isinstance(cause, libvirt.libvirtError) and (
                cause.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
            ):
                return False
            raise
        return True

    def monitor(self, name: str, command: str) -> str:
        """Run a human-monitor (HMP) command in the domain's QEMU."""
        dom = self._lookup(name)
        flags = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        return str(
            self._bounded(
                f"send {command.split()[0]} to {name}",
                libvirt_qemu.qemuMonitorCommand,
                dom,
                command,
                flags,
            )
        )

    def forward_port(self, name: str, guest_port: int) -> int:
        """Forward a kernel-chosen free port on 127.0.0.1 to ``guest_port`` in the guest.

        ``hostfwd_add ... tcp:127.0.0.1:0-:22`` lets the host kernel pick the port at bind
        time, so concurrent jobs can never race for one; ``info usernet`` tells which port.
        """
        out = self.monitor(name, f"hostfwd_add {NETDEV_ID} tcp:127.0.0.1:0-:{guest_port}")
        if out.strip():
            raise PortForwardError(f"QEMU refused the SSH port forward for {name}: {out.strip()}")
        ports = [host for host, guest in self.forwards(name) if guest == guest_port]
        if not ports:
            raise PortForwardError(f"QEMU shows no SSH port forward for {name}")
        return ports[-1]

    def forwards(self, name: str) -> list[tuple[int, int]]:
        """The domain's loopback TCP forwards as (host port, guest port), oldest first:
        the ``HOST_FORWARD`` rows of QEMU's ``info usernet`` on 127.0.0.1 (a read-write
        connection's monitor command). A QEMU that libvirt restored from a save has none
        until one is added (:meth:`forward_port`): QEMU does not save runtime forwards."""
        table = self.monitor(name, "info usernet")
        return [(int(m.group(1)), int(m.group(2))) for m in _HOSTFWD.finditer(table)]

    def list_vmbatch(self) -> list[DomainInfo]:
        """Every running domain whose name has our prefix, with its job metadata."""
        doms = self._bounded("list domains", self.raw.listAllDomains, 0)
        result = []
        for dom in doms:
            name = str(dom.name())
            if not name.startswith(DOMAIN_PREFIX):
                continue
            try:
                xml = str(self._bounded(f"read the XML of {name}", dom.XMLDesc, 0))
            except DomainNotFound:
                continue
            result.append(DomainInfo(name, read_metadata(xml), read_files(xml), _accel(xml)))
        return result

    def status(self, name: str) -> DomainStatus | None:
        """The domain's state, vCPUs and memory now (``virDomainGetInfo``); None if gone."""
        try:
            dom = self._lookup(name)
            info = self._bounded(f"query domain {name}", dom.info)
        except DomainNotFound:
            return None
        state, _max_kib, mem_kib, vcpus, _cpu_time = info
        return DomainStatus(_STATES.get(state, str(state)), int(vcpus), int(mem_kib) // 1024)

    def suspend(self, name: str) -> None:
        """Pause the domain (``virDomainSuspend``): its vCPUs stop, its memory stays. QEMU
        drains and flushes its disks when it stops (``do_vm_stop``). Already paused: no-op."""
        dom = self._lookup(name)
        state = self._bounded(f"query domain {name}", dom.info)[0]
        if state != libvirt.VIR_DOMAIN_PAUSED:
            self._bounded(f"pause domain {name}", dom.suspend)

    def resume(self, name: str) -> None:
        """Continue a paused domain (``virDomainResume``); one that runs: no-op (libvirt
        refuses to resume a running domain)."""
        dom = self._lookup(name)
        state = self._bounded(f"query domain {name}", dom.info)[0]
        if state == libvirt.VIR_DOMAIN_PAUSED:
            self._bounded(f"resume domain {name}", dom.resume)

    def abort_job(self, name: str) -> None:
        """Abort the domain's long job (a save, a migration: ``virDomainAbortJob``), if any;
        best effort (the job may have just ended)."""
        with contextlib.suppress(VmBatchError):
            dom = self._lookup(name)
            self._bounded(f"abort the job of domain {name}", dom.abortJob)

    def set_guest_time(self, name: str) -> str | None:
        """Set the guest's clock to the host's through the QEMU guest agent
        (``virDomainSetTime``; the agent runs ``settimeofday`` and ``hwclock -w``:
        https://libvirt.org/html/libvirt-libvirt-domain.html#virDomainSetTime). After a
        pause the guest's clock is behind (its clocks stop with its vCPUs). None if set;
        else why not (no agent in the image answers within 5 s, ...)."""
        try:
            dom = self._lookup(name)
            self._bounded(f"limit {name}'s agent calls", dom.agentSetResponseTimeout, 5, 0)
            now = time.time()
            stamp = {"seconds": int(now), "nseconds": int((now % 1) * 1e9)}
            self._bounded(f"set the guest clock of {name}", dom.setTime, stamp, 0)
        except VmBatchError as exc:
            return str(exc)
        return None

    def xml(self, name: str, *, migratable: bool = False) -> str:
        """The running domain's live XML; with ``migratable``, as libvirt would send it to
        a migration's destination (``VIR_DOMAIN_XML_MIGRATABLE``: no runtime-only parts)."""
        dom = self._lookup(name)
        flags = libvirt.VIR_DOMAIN_XML_MIGRATABLE if migratable else 0
        return str(self._bounded(f"read the XML of {name}", dom.XMLDesc, flags))

    def set_memory_limit(self, name: str, limit_mib: int) -> None:
        """Set the running domain's memory hard limit, live (see :meth:`create`); errors
        are the caller's (:meth:`limit_memory` destroys the domain on one)."""
        dom = self._lookup(name)
        params = {"hard_limit": limit_mib * 1024}  # KiB
        live = libvirt.VIR_DOMAIN_AFFECT_LIVE
        self._bounded(f"limit the memory of {name}", dom.setMemoryParameters, params, live)

    def migrate(
        self,
        name: str,
        dest: Connection,
        *,
        dest_xml: str,
        disks: tuple[str, ...],
        uri: str | None,
        disks_uri: str | None,
        timeout: float,
    ) -> None:
        """Live-migrate the domain to ``dest``'s libvirtd, copying the top layer of the disks
        ``disks`` (targets such as ``vda``) while it runs.

        Client-managed migration (``virDomainMigrate3``, this process holds both
        connections; https://libvirt.org/migration.html#managed-direct-migration) with
        ``VIR_MIGRATE_LIVE | VIR_MIGRATE_NON_SHARED_INC``: the backing chain must already be
        on the destination, identical, and the destination's top layers pre-created
        (libvirt does not create them for ``_INC``). Not ``PERSIST_DEST``: the domain stays
        transient. ``uri``/``disks_uri``: where the destination's QEMU listens for the
        memory stream and its NBD server for the disks (``tcp://HOST:PORT`` or
        ``unix:///path``, libvirt 6.8+); None: libvirt's default (the destination's
        host name). If it does not end within ``timeout`` seconds the migration is
        aborted (``virDomainAbortJob``) and the domain keeps running here.
        """
        dom = self._lookup(name)
        params: dict[str, Any] = {
            libvirt.VIR_MIGRATE_PARAM_DEST_XML: dest_xml,
            libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: list(disks),
        }
        if uri is not None:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = uri
        if disks_uri is not None:
            params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = disks_uri
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_NON_SHARED_INC
        try:
            self._bounded(
                f"migrate domain {name}", dom.migrate3, dest.raw, params, flags, timeout=timeout
            )
        except LibvirtTimeoutError:
            with contextlib.suppress(LibvirtError):
                self._bounded(f"abort the migration of {name}", dom.abortJob)
            raise

    def completed_job_stats(self, name: str) -> dict[str, int]:
        """Statistics of the domain's last completed job (``virDomainGetJobStats`` with
        ``VIR_DOMAIN_JOB_STATS_COMPLETED``): after a migration, on the destination,
        ``downtime``, ``time_elapsed`` (ms), ``memory_total``, ``disk_total`` (bytes)...
        (https://libvirt.org/html/libvirt-libvirt-domain.html#virDomainGetJobStats)."""
        dom = self._lookup(name)
        flags = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
        stats = self._bounded(f"read the job statistics of {name}", dom.jobStats, flags)
        return {str(k): int(v) for k, v in stats.items() if isinstance(v, int)}

    def ssh_port(self, name: str, guest_port: int) -> int | None:
        """The loopback port QEMU forwards to ``guest_port`` (``info usernet``; needs a
        read-write connection); None if there is none."""
        ports = [host for host, guest in self.forwards(name) if guest == guest_port]
        return ports[-1] if ports else None

    def open_console(
        self,
        name: str,
        on_data: Callable[[bytes], None],
        *,
        force: bool = False,
    ) -> ConsoleStream:
        """Attach to the domain's serial console (``virDomainOpenConsole`` on a
        non-blocking stream, as ``virsh console`` does:
        https://libvirt.org/html/libvirt-libvirt-domain.html#virDomainOpenConsole).
        ``on_data`` gets what the guest writes, from libvirt's event thread. The console
        is a pty whose output virtlogd also writes to the log file: both work at once.
        ``force`` takes the console from another session that holds it."""
        dom = self._lookup(name)
        stream = self._bounded("make a stream", self.raw.newStream, libvirt.VIR_STREAM_NONBLOCK)
        flags = libvirt.VIR_DOMAIN_CONSOLE_FORCE if force else 0
        self._bounded(f"open the console of {name}", dom.openConsole, None, stream, flags)
        return ConsoleStream(stream, on_data)

    def known_domains(self) -> tuple[frozenset[str], frozenset[str]]:
        """Names and UUIDs of every domain libvirt knows, running or defined (any name).

        A QEMU process whose ``-uuid`` is not among them is not libvirt's any more.
        """

        def ids() -> tuple[frozenset[str], frozenset[str]]:
            doms = self.raw.listAllDomains(0)
            # name() and UUIDString() read the handle's own copy: no further round trip.
            return frozenset(str(d.name()) for d in doms), frozenset(
                str(d.UUIDString()).lower() for d in doms
            )

        return self._bounded("list domains", ids)


class ConsoleStream:
    """A domain's console as a libvirt stream: what arrives goes to ``on_data`` (from the
    event loop thread); :meth:`send` writes to the guest; :attr:`ended` is set once the
    console closed (the VM stopped, another session took it, an error)."""

    def __init__(self, stream: Any, on_data: Callable[[bytes], None]) -> None:
        self._stream = stream
        self._on_data = on_data
        self.ended = threading.Event()
        events = (
            libvirt.VIR_STREAM_EVENT_READABLE
            | libvirt.VIR_STREAM_EVENT_ERROR
            | libvirt.VIR_STREAM_EVENT_HANGUP
        )
        stream.eventAddCallback(events, self._event, None)

    def _event(self, stream: Any, events: int, _opaque: object) -> None:
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            try:
                data = stream.recv(65536)
            except libvirt.libvirtError:
                self.ended.set()
                return
            if data == -2:  # nothing after all (EAGAIN)
                return
            if not data:
                self.ended.set()
                return
            self._on_data(bytes(data))
        if events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
            self.ended.set()

    def send(self, data: bytes) -> None:
        """Write ``data`` to the guest's console (a bounded number of tries if libvirt's
        buffer is full; what does not fit then is dropped, as on a serial line)."""
        for _ in range(50):
            if not data or self.ended.is_set():
                return
            try:
                sent = self._stream.send(data)
            except libvirt.libvirtError:
                self.ended.set()
                return
            if sent == -2:
                self.ended.wait(0.02)
                continue
            data = data[sent:]

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.eventRemoveCallback()
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()


_HOSTFWD = re.compile(r"HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+(\d+)")


def _accel(xml: str) -> str:
    """``kvm`` or ``tcg`` from the domain's type attribute (``kvm`` / ``qemu``)."""
    kind = ET.fromstring(xml).get("type", "")  # noqa: S314 - from our own libvirtd
    return {"kvm": "kvm", "qemu": "tcg"}.get(kind, kind)


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _dotted(version: int) -> str:
    return f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"
