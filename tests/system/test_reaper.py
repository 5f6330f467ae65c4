"""`vmbatch cleanup --stale` reaps what a killed `vmbatch run` left, and nothing of a live one."""

from __future__ import annotations

import signal
import subprocess

from tests.system.conftest import Site, site_domains
from vmbatch.libvirt.connection import Connection


def _started(proc: subprocess.Popen[bytes]) -> None:
    """Wait until the job runs in its VM (its first output line)."""
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"running\n"


def test_a_sigkilled_run_is_reaped_and_a_live_one_is_left_alone(
    site: Site, libvirt_conn: Connection
) -> None:
    live = site.popen("run", "--image", "demo", "--", "sh", "-c", "echo running; sleep 600")
    doomed = site.popen("run", "--image", "demo", "--", "sh", "-c", "echo running; sleep 600")
    try:
        _started(live)
        _started(doomed)
        assert len(site_domains(libvirt_conn, site.root)) == 2
        doomed.send_signal(signal.SIGKILL)  # no teardown runs: the VM and its files stay
        doomed.wait(timeout=30)
        assert len(site_domains(libvirt_conn, site.root)) == 2
        done = site.vmbatch("cleanup", "--stale")
        assert done.returncode == 0, done.stderr.decode()
        (line,) = done.stdout.decode().splitlines()
        assert "`vmbatch run` process is gone" in line
        assert len(site_domains(libvirt_conn, site.root)) == 1
        (kept,) = site.job_dir.iterdir()  # only the live run's files stay
        assert (kept / "owner").read_text().startswith(f"{live.pid}:")
        assert kept.name not in line and line.startswith("job run-")
        assert live.poll() is None, "the live run was not touched"
        again = site.vmbatch("cleanup", "--stale")
        assert (again.returncode, again.stdout) == (0, b""), again.stderr.decode()
    finally:
        for proc in (live, doomed):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # a live run tears its VM down itself
            proc.communicate(timeout=120)
