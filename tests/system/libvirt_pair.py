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
