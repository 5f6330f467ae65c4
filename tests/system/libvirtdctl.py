"""The libvirtd that `make test` started (scripts/ensure-libvirtd writes /run/libvirtd.pid):
signalled by PID through a pidfd, and restarted by a test-owned restart command."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from tests.system.conftest import ROOT

PIDFILE = Path("/run/libvirtd.pid")
ENSURE = ROOT / "scripts" / "ensure-libvirtd"


def pid() -> int | None:
    try:
        return int(PIDFILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def is_libvirtd(pid: int | None) -> bool:
    try:
        return pid is not None and Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd"
    except OSError:
        return False


def signal_libvirtd(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to libvirtd ``pid`` through a pidfd, checked to be libvirtd after it is
    open: a PID reused meanwhile is never signalled."""
    fd = os.pidfd_open(pid)
    try:
        assert is_libvirtd(pid), f"pid {pid} is no longer libvirtd"
        signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def restart_script(root: Path) -> tuple[Path, Path]:
    """The test's restart command (root-owned, 0755) and the file it counts its runs in."""
    runs = root / "restart-runs"
    script = root / "restart-libvirtd"
    script.write_text(
        f"""#!/bin/sh
set -eu
echo run >> {runs}
pid=$(cat {PIDFILE} 2>/dev/null || true)
if [ -n "$pid" ] && [ "$(cat /proc/$pid/comm 2>/dev/null)" = libvirtd ]; then
  kill -KILL "$pid"
  # ensure-libvirtd starts none while the PID is alive: wait until it is reaped (bounded).
  i=0
  while [ -e /proc/$pid ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
fi
exec {ENSURE} {sys.executable}
"""
    )
    script.chmod(0o755)
    return script, runs
