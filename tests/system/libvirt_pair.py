"""Test-owned libvirtds on this machine, as migration needs them (:class:`NamespacedLibvirtd`,
two of them in :class:`LibvirtPair`): each in a network namespace of its own (``ip netns
add``, made and removed here, entered with ``nsenter --net``) and a mount namespace of its
own (tests/system/libvirtd.py's private bind mounts over /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt, /var/log/libvirt, /etc/libvirt), each with its own virtlogd and a
distinct ``host_uuid`` in its ``libvirtd.conf``. Also: a tiny-guest VM that counts
(:func:`start_counter_vm`) and SSH into it from a namespace (:func:`guest_ssh`). (A
migrated job's starter is relayed by vmbatch itself: vmbatch/relay.py.)

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
The mount namespaces end with their last process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import libvirt

from tests.system.libvirtd import PrivateLibvirtd
from vmbatch import process
from vmbatch.config import Config
from vmbatch.contextualize import keys
from vmbatch.contextualize.nocloud import build_iso
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import DiskSpec, DomainSpec, JobMetadata, build_xml, domain_name

IP = "/usr/bin/ip"
QEMU = Path("/usr/bin/qemu-system-x86_64")
QBOOT = Path("/usr/share/qemu/qboot.rom")
#: Counts on the guest's console, 10 a second, from a boot command of the tiny guest.
COUNTER = (
    "i=0\n"
    'while :; do i=$((i+1)); echo "count $i" >/dev/console; usleep 100000; done'
    " </dev/null >/dev/null 2>&1 &\n"
)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=30, check=False)


class NamespacedLibvirtd(PrivateLibvirtd):
    """A :class:`PrivateLibvirtd` in a network namespace of its own (made by :meth:`start`,
    ``lo`` up: ``hostfwd`` binds 127.0.0.1 there) with its own ``host_uuid``. :meth:`stop`
    destroys its domains, stops the daemons, kills by PID whatever still runs in the
    namespace, and removes it."""

    def __init__(self, base: Path, *, qemu_conf: str = "") -> None:
        self.host_uuid = str(uuid.uuid4())
        super().__init__(
            base,
            qemu_conf=qemu_conf,
            libvirtd_conf=f'host_uuid = "{self.host_uuid}"',
            netns=f"vmbatch-mig-{uuid.uuid4().hex[:8]}",
        )
        self._netns_made = False

    def start(self, timeout: float = 60) -> None:
        assert self.netns is not None
        if not self._netns_made:
            r = _ip("netns", "add", self.netns)
            if r.returncode != 0:
                raise RuntimeError(f"ip netns add {self.netns}: {r.stderr.strip()}")
            self._netns_made = True
            r = _ip("-n", self.netns, "link", "set", "lo", "up")
            if r.returncode != 0:
                raise RuntimeError(f"ip -n {self.netns} link set lo up: {r.stderr.strip()}")
        super().start(timeout)

    def stop(self) -> None:
        """Everything down, whatever state it is in; never raises for what is gone."""
        if self.pid() is not None:
            _destroy_all(self.uri)
        super().stop()
        if self._netns_made and self.netns is not None:
            _kill_namespace(self.netns)
            _ip("netns", "del", self.netns)
            self._netns_made = False


class LibvirtPair:
    """``src`` and ``dst``: two :class:`NamespacedLibvirtd`, and a directory for the
    migration's Unix sockets.

    Both run without cgroup controllers (``cgroup_controllers = []``): libvirt names a
    domain's cgroup ``qemu-ID-NAME`` and both daemons number their domains from 1, so the
    same VM on both would share one cgroup directory on this one host.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(mode=0o755, parents=True, exist_ok=True)
        no_cgroups = "cgroup_controllers = []"
        self.src = NamespacedLibvirtd(base / "src", qemu_conf=no_cgroups)
        self.dst = NamespacedLibvirtd(base / "dst", qemu_conf=no_cgroups)
        self.netns = (str(self.src.netns), str(self.dst.netns))
        #: Where the migration and NBD Unix sockets go: both daemons' QEMUs (user
        #: libvirt-qemu) and libvirtds (root) reach it, nobody else.
        self.sockets = make_socket_dir(base / "sockets")

    def start(self) -> None:
        self.src.start()
        self.dst.start()

    def stop(self) -> None:
        for daemon in (self.src, self.dst):
            daemon.stop()

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


def make_socket_dir(path: Path) -> Path:
    """A directory for migration sockets: QEMU (libvirt-qemu) listens and connects there."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.chown(path, "libvirt-qemu", "libvirt-qemu")
    return path


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


@dataclass(frozen=True)
class CounterVM:
    """A tiny-guest VM started from vmbatch's own domain XML, counting on its console."""

    name: str
    job_id: str
    job_dir: Path
    #: Logs in as root (authorized by the seed) and pins the guest's host key.
    user: keys.KeyPair
    host: keys.KeyPair


def _indent(text: str, by: str = "  ") -> str:
    return "".join(by + line for line in text.splitlines(keepends=True))


def start_counter_vm(conn: Connection, guest_dir: Path, job_dir: Path) -> CounterVM:
    """Start a VM of the tiny guest (guests/tiny) on ``conn`` the way vmbatch builds a job's
    domain (:func:`build_xml`: overlay on the guest's disk, NoCloud seed as a read-only
    disk, console log through virtlogd, user network with restrict=on), with a boot
    command that counts on the console, 10 a second."""
    cfg = Config()
    job_id = f"mig{uuid.uuid4().hex[:6]}"
    job_dir.mkdir(mode=0o711)
    overlay = job_dir / "overlay.qcow2"
    process.run(
        [str(cfg.tools.qemu_img), "create", "-q", "-f", "qcow2", "-F", "qcow2",
         "-b", str(guest_dir / "disk.qcow2"), str(overlay)],
        timeout=60,
    )  # fmt: skip
    user, host = keys.generate("test"), keys.generate("host")
    user_data = (
        "#cloud-config\n"
        f"bootcmd:\n- |\n{_indent(COUNTER)}"
        f"ssh_authorized_keys:\n- {user.public_openssh}\n"
        f"ssh_keys:\n  ed25519_private: |\n{_indent(host.private_openssh, '    ')}"
    )
    meta = f"instance-id: {job_id}\nlocal-hostname: migrant\n"
    seed = job_dir / "seed.iso"
    seed.write_bytes(build_iso({"user-data": user_data.encode(), "meta-data": meta.encode()}))
    name = domain_name(job_id)
    xml = build_xml(
        DomainSpec(
            name=name,
            domain_type="qemu",
            memory_mib=256,
            vcpus=1,
            machine="q35",
            disks=(DiskSpec(overlay, "qcow2"), DiskSpec(seed, "raw", readonly=True)),
            console_log=job_dir / "console.log",
            metadata=JobMetadata(job_id, "root", "test", "demo", "test"),
            emulator=QEMU,
            kernel=guest_dir / "vmlinux",
            initrd=guest_dir / "initrd.cpio",
            cmdline=(guest_dir / "cmdline").read_text().strip(),
            firmware=QBOOT if QBOOT.exists() else None,
            outbound_network=False,
        )
    )
    conn.create(name, xml)
    return CounterVM(name, job_id, job_dir, user, host)


def guest_ssh(ns: str, vm: CounterVM, port: int, command: str) -> str:
    """Run ``command`` in ``vm`` as root over SSH from inside namespace ``ns`` (where its
    port forward listens), its host key pinned; its output, or AssertionError."""
    ssh_dir = vm.job_dir.parent / f"ssh-{vm.job_id}"
    if not ssh_dir.exists():
        ssh_dir.mkdir(mode=0o700)
        (ssh_dir / "id").touch(mode=0o600)
        (ssh_dir / "id").write_text(vm.user.private_openssh)
        (ssh_dir / "known_hosts").write_text(f"guest {vm.host.public_openssh}\n")
    out = subprocess.run(
        [IP, "netns", "exec", ns, "/usr/bin/ssh", "-F", "/dev/null",
         "-i", str(ssh_dir / "id"), "-o", f"UserKnownHostsFile={ssh_dir / 'known_hosts'}",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
         "-o", "ConnectTimeout=20", "-o", "HostKeyAlias=guest", "-p", str(port),
         "root@127.0.0.1", command],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def wait_console(log: Path, text: bytes, timeout: float = 60) -> None:
    """Wait (bounded) until the console log ``log`` holds ``text``."""
    deadline = time.monotonic() + timeout
    while not log.exists() or text not in log.read_bytes():
        if time.monotonic() > deadline:
            raise AssertionError(f"{log}: no {text!r} within {timeout} s")
        time.sleep(0.1)  # polling with a deadline
