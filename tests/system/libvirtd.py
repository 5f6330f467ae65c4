"""A private libvirtd (and virtlogd) for tests and benchmarks that kill, stop or restart it.

The machine's libvirtd (scripts/ensure-libvirtd, ``/run/libvirtd.pid``) serves every test run
on the machine at once; a harness that SIGKILLs libvirtd dozens of times would break other
people's runs. This one is the same ``/usr/sbin/libvirtd`` with the same configuration, in a
private mount namespace (``unshare -m``, util-linux) in which libvirt's own directories are
bind mounts of fresh directories under ``base``:

============================ ==================================================
path in the namespace        why
============================ ==================================================
``/etc/libvirt``             a copy without autostarted networks (the host's
                             ``default`` network would clash with the shared
                             daemon's bridge); ``qemu.conf`` + ``namespaces = []``
                             and the caller's ``qemu_conf`` lines
``/run/libvirt``             sockets (``libvirt-sock``, ``virtlogd-sock``) and
                             the running domains' status XML
``/var/lib/libvirt``         per-domain directories (monitor sockets)
``/var/cache/libvirt``       QEMU capabilities cache
``/var/log/libvirt``         per-domain QEMU logs
``/dev/kvm``                 only where KVM does not work (as ensure-libvirtd)
============================ ==================================================

Clients reach it from outside the namespace through its socket's real path:
``qemu+unix:///system?socket=<base>/run/libvirt-sock`` (libvirt's URI ``socket``
parameter, https://libvirt.org/uri.html). Each (re)start makes a fresh namespace with the
same bind mounts, so a restarted libvirtd finds the domains its predecessor left running
(their status XML and monitor sockets are where it looks). libvirtd runs in the foreground
under scripts/subreaper (as ensure-libvirtd runs the shared one); every PID is our own
child or written by our daemons into ``base``, and is stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[2]
SUBREAPER = ROOT / "scripts" / "subreaper"
#: (directory in the namespace, subdirectory of base, owner, mode) as Debian's package has them.
_DIRS = (
    ("/run/libvirt", "run", "root", 0o755),
    ("/var/lib/libvirt", "lib", "root", 0o755),
    ("/var/cache/libvirt", "cache", "root", 0o711),
    ("/var/log/libvirt", "log", "root", 0o755),
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kvm_usable() -> bool:
    """What scripts/ensure-libvirtd asks: does vmbatch's own probe accept KVM here?"""
    if not Path("/dev/kvm").exists():
        return True  # nothing to hide
    from vmbatch import accel
    from vmbatch.config import Config

    return accel.choose(Config()).accel == "kvm"


class PrivateLibvirtd:
    """libvirtd + virtlogd of our own; ``uri`` reaches it. Use as a context manager."""

    def __init__(
        self,
        base: Path,
        *,
        hide_kvm: bool | None = None,
        qemu_conf: str = "",
        libvirtd_conf: str = "",
        netns: str | None = None,
    ) -> None:
        """``qemu_conf``, ``libvirtd_conf``: lines appended to the private copies of
        ``qemu.conf`` and ``libvirtd.conf``. ``netns``: run both daemons (and so their
        QEMUs) in this network namespace (``ip netns add``, made and removed by the
        caller)."""
        self.base = base
        self.qemu_conf = qemu_conf
        self.libvirtd_conf = libvirtd_conf
        self.netns = netns
        self.base.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.socket = base / "run" / "libvirt-sock"
        self.uri = f"qemu+unix:///system?socket={self.socket}"
        self.pidfile = base / "libvirtd.pid"  # written by libvirtd (-p)
        self.virtlogd_pidfile = base / "virtlogd.pid"
        self.log = base / "libvirtd.out"
        self.hide_kvm = (not kvm_usable()) if hide_kvm is None else hide_kvm
        self.procs: list[subprocess.Popen[bytes]] = []
        self.starts = 0

    # -- set-up ---------------------------------------------------------------------------

    def _prepare(self) -> None:
        etc = self.base / "etc"
        if not etc.exists():
            shutil.copytree("/etc/libvirt", etc, symlinks=True)
            shutil.rmtree(etc / "qemu" / "networks" / "autostart", ignore_errors=True)
            shutil.rmtree(etc / "storage" / "autostart", ignore_errors=True)
            with (etc / "qemu.conf").open("a") as fh:
                if self.hide_kvm:
                    # libvirt's per-QEMU /dev cannot replicate our bind mount on /dev/kvm.
                    fh.write("\nnamespaces = []\n")
                fh.write(f"\n{self.qemu_conf}\n" if self.qemu_conf else "")
            if self.libvirtd_conf:
                with (etc / "libvirtd.conf").open("a") as fh:
                    fh.write(f"\n{self.libvirtd_conf}\n")
        for _, sub, owner, mode in _DIRS:
            d = self.base / sub
            d.mkdir(mode=mode, exist_ok=True)
            shutil.chown(d, owner, owner)
        qemu_lib = self.base / "lib" / "qemu"
        if not qemu_lib.exists():
            qemu_lib.mkdir(mode=0o750)
            shutil.chown(qemu_lib, "libvirt-qemu", "libvirt-qemu")
        (self.base / "cache" / "qemu").mkdir(mode=0o711, exist_ok=True)
        (self.base / "log" / "qemu").mkdir(mode=0o755, exist_ok=True)
        no_kvm = self.base / "no-kvm"
        if self.hide_kvm and not no_kvm.exists():
            no_kvm.touch(mode=0o000)

    def _namespace_script(self, program: str) -> str:
        """/bin/sh text: bind libvirt's directories, then exec PROGRAM (shell words)."""
        q = shlex.quote
        mounts = [f"mount --bind {q(str(self.base / 'etc'))} /etc/libvirt"]
        mounts += [f"mount --bind {q(str(self.base / sub))} {path}" for path, sub, _, _ in _DIRS]
        if self.hide_kvm:
            mounts.append(f"mount --bind {q(str(self.base / 'no-kvm'))} /dev/kvm")
        return " && ".join([*mounts, f"exec {program}"])

    def _spawn(self, program: str) -> subprocess.Popen[bytes]:
        # nsenter enters the network namespace and execs the rest (no process of its own).
        # Not `ip netns exec`: it also remounts /sys, which hides the cgroup file systems
        # from libvirtd (no memory limits then).
        netns = ["/usr/bin/nsenter", f"--net=/run/netns/{self.netns}"] if self.netns else []
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                [*netns, "/usr/bin/unshare", "-m", "--propagation", "private", "/bin/sh", "-c",
                 self._namespace_script(program)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    # -- life cycle -----------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start virtlogd (if not running) and libvirtd; return once libvirtd answers."""
        self._prepare()
        if not self._pid_alive(self.virtlogd_pidfile):
            self._spawn(f"/usr/sbin/virtlogd -p {shlex.quote(str(self.virtlogd_pidfile))}")
        self.pidfile.unlink(missing_ok=True)
        q = shlex.quote
        self._spawn(
            f"{q(str(SUBREAPER))} {q(str(self.base / 'subreaper.pid'))}"
            f" /usr/sbin/libvirtd -p {q(str(self.pidfile))}"
        )
        self.starts += 1
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run(
                ["/usr/bin/virsh", "-c", self.uri, "version"],
                capture_output=True, timeout=30, check=False,
            )  # fmt: skip
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"private libvirtd not answering after {timeout} s: "
                    f"{r.stderr.decode(errors='replace').strip()}\n{self._tail()}"
                )
            time.sleep(0.2)  # polling with a deadline

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return ""

    @staticmethod
    def _pid_alive(pidfile: Path) -> bool:
        try:
            return _alive(int(pidfile.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            return False

    def pid(self) -> int | None:
        """libvirtd's PID while it runs (from the PID file it wrote), else None."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def rss_kib(self) -> int | None:
        pid = self.pid()
        if pid is None:
            return None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return None

    def signal(self, sig: signal.Signals) -> int | None:
        """Send SIG to libvirtd (by its PID); return the PID, or None if it was not running."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pid

    def wait_dead(self, pid: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd {pid} still alive {timeout} s after SIGKILL")
            time.sleep(0.05)  # polling with a deadline

    def stop(self) -> None:
        """Stop libvirtd (SIGTERM: it leaves running domains alone) and virtlogd, by PID."""
        for pidfile in (self.pidfile, self.virtlogd_pidfile):
            with contextlib.suppress(OSError, ValueError, IndexError, ProcessLookupError):
                pid = int(pidfile.read_text().split()[0])
                if _alive(pid):
                    os.kill(pid, signal.SIGCONT)  # a stopped daemon cannot handle SIGTERM
                    os.kill(pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)

    def __enter__(self) -> PrivateLibvirtd:
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
