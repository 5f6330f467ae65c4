"""Two test-owned libvirtds on this machine, as migration needs them: each in a network
namespace of its own (``ip netns add``, made and removed here) and a mount namespace of its
own (tests/system/libvirtd.py's private bind mounts over /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt, /var/log/libvirt, /etc/libvirt), each with its own virtlogd and a
distinct ``host_uuid`` in its ``libvirtd.conf``.

Why: libvirt refuses a migration between daemons whose host UUIDs are equal ("Attempt to
migrate guest to the same host", qemu_migration_cookie.c, libvirt 9.0; the default UUID
comes from SMBIOS, the same for both); and a QEMU of the destination must not share
loopback ports, ``/run/libvirt`` or monitor sockets with the source's. The machine's shared
libvirtd (scripts/ensure-libvirtd) is not touched: other people's tests use it.

Traffic stays on this machine: clients reach each daemon through its socket's real path;
migration and disk (NBD) streams go over Unix sockets in :attr:`LibvirtPair.sockets`, a
directory both daemons see (``unix://`` migration URIs, libvirt 6.8+); a QEMU's loopback
(``hostfwd``) lives in its daemon's namespace.

Clean-up is by PID and always runs: domains destroyed through their own daemon, the daemons
stopped by their PID files, then any process still in one of our namespaces (``ip netns
pids``: only processes our daemons started can be there) killed, and the namespaces removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from types import TracebackType

import libvirt

from tests.system.libvirtd import PrivateLibvirtd

IP = "/usr/bin/ip"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=30, check=False)


class LibvirtPair:
    """``src`` and ``dst``: two :class:`PrivateLibvirtd` in namespaces of their own."""

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(mode=0o755, parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        self.host_uuids = (str(uuid.uuid4()), str(uuid.uuid4()))
        self.netns = (f"vmbatch-mig-{tag}-src", f"vmbatch-mig-{tag}-dst")
        self.src, self.dst = (
            PrivateLibvirtd(
                base / side,
                libvirtd_conf=f'host_uuid = "{host_uuid}"',
                netns=ns,
            )
            for side, host_uuid, ns in zip(("src", "dst"), self.host_uuids, self.netns, strict=True)
        )
        #: Where the migration and NBD Unix sockets go: both daemons' QEMUs (user
        #: libvirt-qemu) and libvirtds (root) reach it, nobody else.
        self.sockets = base / "sockets"
        self._made: list[str] = []

    def start(self) -> None:
        self.sockets.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(self.sockets, "libvirt-qemu", "libvirt-qemu")
        for ns in self.netns:
            r = _ip("netns", "add", ns)
            if r.returncode != 0:
                raise RuntimeError(f"ip netns add {ns}: {r.stderr.strip()}")
            self._made.append(ns)
            r = _ip("-n", ns, "link", "set", "lo", "up")  # hostfwd binds 127.0.0.1 there
            if r.returncode != 0:
                raise RuntimeError(f"ip -n {ns} link set lo up: {r.stderr.strip()}")
        self.src.start()
        self.dst.start()

    def stop(self) -> None:
        """Everything down, whatever state it is in; never raises for what is gone."""
        for daemon in (self.src, self.dst):
            if daemon.pid() is not None:
                _destroy_all(daemon.uri)
            daemon.stop()
        for ns in self._made:
            _kill_namespace(ns)
            _ip("netns", "del", ns)
        self._made.clear()

    def __enter__(self) -> LibvirtPair:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _destroy_all(uri: str) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn = libvirt.open(uri)
        try:
            for dom in conn.listAllDomains(0):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
        finally:
            conn.close()


def _kill_namespace(ns: str) -> None:
    """SIGKILL, by PID, whatever still runs in our namespace ``ns`` (a QEMU whose daemon
    died first), and wait (bounded) until it is gone."""
    deadline = time.monotonic() + 30
    while True:
        pids = [int(p) for p in _ip("netns", "pids", ns).stdout.split()]
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)  # polling with a deadline
