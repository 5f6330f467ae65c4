"""`vmbatch suspend` / `resume` against a real job VM (tiny guest, real libvirtd/QEMU):
the paused VM's QEMU uses no CPU for its vCPUs, and the job continues to its complete
output and exit status after the resume. Jobs are made as pbs_mom makes them
(tests/system/test_torque.py's ``Mom``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.system.conftest import BatchSite
from tests.system.test_torque import Mom, _finish
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import domain_name
from vmbatch.reaper import find_qemus

QEMU = Path("/usr/bin/qemu-system-x86_64")
#: Busy in the guest (so its vCPU runs), counting to 40 with a line per count.
COUNTER = (
    "#!/bin/sh\ni=0\nwhile [ $i -lt 40 ]; do i=$((i+1)); echo count $i;"
    " j=0; while [ $j -lt 20000 ]; do j=$((j+1)); done; done\nexit 5\n"
)


def _vcpu_ticks(pid: int) -> int:
    """utime+stime (clock ticks) of QEMU's vCPU threads (``CPU n/TCG`` or ``CPU n/KVM``)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().startswith("CPU "):
            stat = (task / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total


def _wait_state(conn: Connection, name: str, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (status := conn.status(name)) is None or status.state != state:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)  # polling with a deadline


def test_a_suspended_vm_uses_no_cpu_and_its_job_continues_after_resume(
    batch_site: BatchSite, libvirt_conn: Connection
) -> None:
    bs = batch_site
    mom = Mom(bs, COUNTER)
    name = domain_name(mom.job_id)
    try:
        assert mom.prologue().returncode == 0
        starter = mom.starter()
        (pid,) = [q.pid for q in find_qemus(bs.site.job_dir, QEMU) if q.name == name]
        hz = os.sysconf("SC_CLK_TCK")
        before = _vcpu_ticks(pid)
        time.sleep(2)  # a measuring window, not a wait for something to happen
        assert _vcpu_ticks(pid) - before > 0.2 * 2 * hz, "the job's vCPU must be busy"

        res = bs.site.vmbatch("suspend", mom.job_id)
        assert res.returncode == 0, res.stderr.decode()
        _wait_state(libvirt_conn, name, "paused")
        paused = _vcpu_ticks(pid)
        time.sleep(3)  # a measuring window: a paused VM's vCPU threads get no CPU time
        assert _vcpu_ticks(pid) == paused
        ps = bs.site.vmbatch("ps").stdout.decode()
        assert any(line.startswith(mom.job_id) and " paused " in line for line in ps.splitlines())

        res = bs.site.vmbatch("resume", mom.job_id)
        assert res.returncode == 0, res.stderr.decode()
        assert b"running again after" in res.stdout
        _wait_state(libvirt_conn, name, "running")
        status, out, err = _finish(starter)
        assert status == 5, err
        assert out.splitlines() == [f"count {i}" for i in range(1, 41)]
    finally:
        mom.epilogue(0)
        bs.site.vmbatch("cleanup", mom.job_id)
