"""A real NFS server for tests: NFS-Ganesha 4.3 (VFS backend) on 127.0.0.1, NFSv4 only.

The kernel NFS server cannot run on the test machines (docs/platform.md). Ganesha is started by
PID, in the foreground, with its configuration, log, PID file and recovery directory under
the test's own directory, on a free loopback port; it is stopped by that PID. Settings
(docs/platform.md, NFS-Ganesha's ganesha-config(8)/ganesha-core-config(8)): ``Graceless``
(no 90 s grace period at start), ``Only_Numeric_Owners`` (sec=sys uids as numbers, not
mapped to nobody), ``Squash = No_Root_Squash``; NLM, RQUOTA and UDP off, because without
rpcbind Ganesha 4.3 exits (status 2) when it cannot register them.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

GANESHA = "/usr/bin/ganesha.nfsd"
#: The export's NFSv4 pseudo path: clients mount ``server:/export``.
PSEUDO = "/export"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NfsServer:
    """One Ganesha instance exporting ``root/export`` read-write at ``/export``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.export = root / "export"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.export.mkdir(parents=True, mode=0o755)
        (root / "recovery").mkdir(mode=0o700)
        self.conf = root / "ganesha.conf"
        self.log = root / "ganesha.log"
        self.conf.write_text(
            f"""
NFS_CORE_PARAM {{
    NFS_Port = {self.port}; Bind_addr = 127.0.0.1; Protocols = 4;
    Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false;
}}
NFSV4 {{
    Graceless = true; Lease_Lifetime = 10; Only_Numeric_Owners = true;
    RecoveryBackend = fs; RecoveryRoot = "{root / "recovery"}";
}}
EXPORT {{
    Export_Id = 1; Path = "{self.export}"; Pseudo = {PSEUDO};
    Access_Type = RW; Squash = No_Root_Squash; SecType = sys; Protocols = 4;
    FSAL {{ Name = VFS; }}
}}
"""
        )

    @property
    def url(self) -> str:
        return f"nfs://127.0.0.1:{self.port}{PSEUDO}"

    def start(self) -> None:
        """Start Ganesha and wait until it accepts connections (polled, bounded)."""
        self.proc = subprocess.Popen(
            [GANESHA, "-F", "-f", str(self.conf), "-L", str(self.log),
             "-p", str(self.root / "ganesha.pid"), "-N", "NIV_EVENT"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ganesha exited {self.proc.returncode}: {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)  # polling for the port, bounded by the deadline
        raise RuntimeError(f"ganesha did not listen on {self.port}: {self.log_tail()}")

    def stop(self) -> None:
        """Stop our Ganesha (by its PID); SIGKILL if it does not exit cleanly."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-10:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> NfsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
