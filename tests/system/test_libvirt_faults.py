"""libvirtd that hangs under vmbatch: calls are bounded, the cause is named, nothing leaks.

The test stops the libvirtd that `make test` started (scripts/ensure-libvirtd writes
/run/libvirtd.pid), by its PID, with SIGSTOP, and always resumes it with SIGCONT. The stop
stays well under the session connection's keepalive window (5 s x 4), so the other tests'
connection survives it.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.system.conftest import Site, site_domains
from vmbatch.libvirt.connection import Connection

PIDFILE = Path("/run/libvirtd.pid")


@contextmanager
def stopped(pid: int) -> Iterator[Callable[[], None]]:
    """SIGSTOP ``pid``; the yielded function (and the exit, in any case) resumes it."""
    resumed = False

    def resume() -> None:
        nonlocal resumed
        if not resumed:
            os.kill(pid, signal.SIGCONT)
            resumed = True

    os.kill(pid, signal.SIGSTOP)
    try:
        yield resume
    finally:
        resume()


def _wait_line(
    proc: subprocess.Popen[bytes], needle: bytes, seen: list[bytes], limit: float
) -> bool:
    """Read proc's stderr lines (kept in ``seen``) until one holds ``needle``."""
    assert proc.stderr is not None
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if not ready:
            continue
        line = proc.stderr.readline()
        if not line:
            return False
        seen.append(line)
        if needle in line:
            return True
    return False


def test_hung_libvirtd_is_named_and_after_it_resumes_no_vm_or_file_is_left(
    site: Site, libvirt_conn: Connection
) -> None:
    """Issue 14: with libvirtd SIGSTOPped during `vmbatch run`, the run blamed a missing
    domain ("client socket is closed"), removed the job's files and left the VM running.
    Now the message names libvirtd, and teardown keeps trying on fresh connections until
    libvirtd answers again, so the VM is destroyed once it resumes."""
    if not PIDFILE.exists():
        pytest.skip("libvirtd was not started by scripts/ensure-libvirtd (no /run/libvirtd.pid)")
    pid = int(PIDFILE.read_text().split()[0])
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd"
    site.write(
        "\n[libvirt]\ntimeout = 3\nkeepalive_interval = 1\nkeepalive_count = 2\n"
        "teardown_timeout = 120\n"
    )
    proc = site.popen("run", "--image", "demo", "--", "sleep", "2")
    seen: list[bytes] = []
    try:
        assert _wait_line(proc, b"SSH forwarded", seen, 300), b"".join(seen).decode()
        with stopped(pid) as resume:
            retrying = _wait_line(proc, b"trying again on a new connection", seen, 60)
            resume()
        assert retrying, b"".join(seen).decode()
        _, rest = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (b"".join(seen) + rest).decode()
    assert proc.returncode in (0, 75), text
    assert "libvirt did not" in text or "lost the connection to libvirtd" in text
    assert "could not find domain" not in text, "the domain was never missing"
    assert "destroyed VM" in text
    assert site_domains(libvirt_conn, site.root) == set()
    assert not site.job_dir.exists() or not list(site.job_dir.iterdir())
    print(text)  # which way it went (boot failed, or the job ran and teardown waited)
