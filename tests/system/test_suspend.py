"""Suspending a job's VM, against real job VMs (tiny guest, real libvirtd/QEMU):

- `vmbatch suspend` / `resume` by hand (jobs made as pbs_mom makes them,
  tests/system/test_torque.py's ``Mom``);
- the real Slurm's ``scontrol suspend`` / ``resume``, with ``vmbatch agent`` running.

Each time the paused VM's vCPU threads get no CPU time, the pause outlasts every timeout of
vmbatch (shortened by a drop-in, so that takes seconds), and the job continues to its
complete output and exit status after the resume."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.system.conftest import BatchSite, SlurmSite
from tests.system.test_torque import BIN, Mom, _finish
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import domain_name
from vmbatch.reaper import find_qemus

QEMU = Path("/usr/bin/qemu-system-x86_64")
#: Busy in the guest (so its vCPU runs), counting to 40 with a line per count; at the end
#: the guest's clock (epoch seconds).
COUNTER = (
    "#!/bin/sh\ni=0\nwhile [ $i -lt 40 ]; do i=$((i+1)); echo count $i;"
    " j=0; while [ $j -lt 20000 ]; do j=$((j+1)); done; done\necho clock $(date +%s)\nexit 5\n"
)


#: Every timeout of vmbatch that could count a pause, shortened: the pauses below last
#: longer than all of them together.
SHORT_TIMEOUTS = "[ssh]\nreconnect_timeout = 2\nliveness_interval = 1\nconnect_timeout = 2\n"
#: Seconds a VM stays paused in these tests: more than the shortened timeouts together.
PAUSE = 6.0


def _short_timeouts(bs: BatchSite) -> None:
    dropin = bs.site.root / "vmbatch.d"
    dropin.mkdir(exist_ok=True)
    (dropin / "60-short-timeouts.toml").write_text(SHORT_TIMEOUTS)


def _process_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


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
    _short_timeouts(bs)
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
        time.sleep(PAUSE)  # the pause under test: longer than every (shortened) timeout
        assert _vcpu_ticks(pid) == paused
        ps = bs.site.vmbatch("ps").stdout.decode()
        assert any(line.startswith(mom.job_id) and " paused " in line for line in ps.splitlines())

        res = bs.site.vmbatch("resume", mom.job_id)
        assert res.returncode == 0, res.stderr.decode()
        assert b"running again after" in res.stdout
        _wait_state(libvirt_conn, name, "running")
        status, out, err = _finish(starter)
        ended = time.time()
        assert status == 5, err
        *counts, clock = out.splitlines()
        assert counts == [f"count {i}" for i in range(1, 41)]
        # The guest's clock stopped during the pause; vmbatch set it to the host's after
        # (its guest agent): it is not PAUSE seconds behind.
        guest_now = int(clock.removeprefix("clock "))
        assert ended - 3 <= guest_now <= ended + 1, (guest_now, ended)
    finally:
        mom.epilogue(0)
        bs.site.vmbatch("cleanup", mom.job_id)


def test_scontrol_suspend_pauses_the_vm_and_resume_continues_the_job(
    slurm: SlurmSite, agent: Path, libvirt_conn: Connection
) -> None:
    """Through the real Slurm 22.05 (SIGTSTP, SIGSTOP 2 s later, SIGCONT on resume): the
    agent pauses the VM while the job is suspended, for longer than every timeout."""
    _short_timeouts(slurm.bs)
    job_id = slurm.submit(COUNTER.replace("-lt 40", "-lt 50"))
    name = domain_name(job_id)
    out = slurm.user.home / f"slurm-{job_id}.out"
    deadline = time.monotonic() + 180
    while not (out.exists() and "count 2\n" in out.read_text()):
        assert time.monotonic() < deadline, (slurm.cluster.job(job_id), agent.read_text())
        time.sleep(0.2)  # polling with a deadline: the job is running
    (pid,) = [q.pid for q in find_qemus(slurm.bs.site.job_dir, QEMU) if q.name == name]
    hz = os.sysconf("SC_CLK_TCK")
    before = _vcpu_ticks(pid)
    time.sleep(2)  # a measuring window, not a wait for something to happen
    assert _vcpu_ticks(pid) - before > 0.2 * 2 * hz, "the job's vCPU must be busy"

    slurm.cluster.scontrol("suspend", job_id)
    _wait_state(libvirt_conn, name, "paused")
    vcpus, process = _vcpu_ticks(pid), _process_ticks(pid)
    time.sleep(PAUSE)  # the suspension under test: longer than every (shortened) timeout
    assert _vcpu_ticks(pid) == vcpus
    assert _process_ticks(pid) - process < 0.05 * PAUSE * hz  # QEMU's main loop only
    assert slurm.cluster.job(job_id)["JobState"] == "SUSPENDED"
    assert f"job {job_id}: suspended by the scheduler; VM paused" in agent.read_text()

    slurm.cluster.scontrol("resume", job_id)
    _wait_state(libvirt_conn, name, "running")
    job = slurm.settled(job_id, timeout=180)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "5:0"), slurm.output(job_id)
    lines = slurm.output(job_id).splitlines()
    assert [x for x in lines if x.startswith("count")] == [f"count {i}" for i in range(1, 51)]
    assert f"job {job_id}: resumed by the scheduler" in agent.read_text()


def under_a_pbs_mom(
    mom: Mom, out: Path, err: Path
) -> tuple[subprocess.Popen[bytes], Callable[[], int]]:
    """Start the job's starter as pbs_mom does (its child, as the job's user, leading its
    own session, the job's id in its environment), where pbs_mom is played by a root
    process whose program is named ``pbs_mom`` (a copy of bash): the node agent trusts it
    as it would the real one. (the fake pbs_mom, a function giving the starter's pid)"""
    bs = mom.bs
    fake = bs.site.root / "sbin" / "pbs_mom"
    fake.parent.mkdir(exist_ok=True)
    shutil.copy("/bin/bash", fake)
    u = bs.user
    pid_file = bs.site.root / f"starter-{mom.job_id}.pid"
    line = bs.site.root / f"line-{mom.job_id}"
    line.write_text(f"{mom.script}\n")
    env = {"PBS_JOBID": mom.job_id, "HOME": str(u.home), "USER": u.name,
           "PATH": "/bin:/usr/bin", **bs.env}  # fmt: skip
    argv = " ".join(
        ["setsid", "setpriv", f"--reuid={u.uid}", f"--regid={u.gid}", "--clear-groups",
         str(BIN / "vmbatch-starter"), "/bin/sh"]
    )  # fmt: skip
    proc = subprocess.Popen(
        [str(fake), "-c", f"{argv} <{line} >{out} 2>{err} & echo $! >{pid_file}; wait $!"],
        env=env, cwd=u.home, stdin=subprocess.DEVNULL,
    )  # fmt: skip

    def starter_pid() -> int:
        deadline = time.monotonic() + 30
        while not (text := pid_file.read_text() if pid_file.exists() else "").strip():
            assert time.monotonic() < deadline, "the fake pbs_mom did not start the starter"
            time.sleep(0.05)  # polling with a deadline
        return int(text)

    return proc, starter_pid


def stop_under_a_pbs_mom(proc: subprocess.Popen[bytes] | None, mom: Mom) -> None:
    """End what :func:`under_a_pbs_mom` started and is still running, by PID (the test's
    own processes: the fake pbs_mom and the job starter it started)."""
    if proc is None or proc.poll() is not None:
        return
    pid_file = mom.bs.site.root / f"starter-{mom.job_id}.pid"
    with contextlib.suppress(ValueError, OSError):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
    proc.kill()
    proc.wait()


def test_torque_suspend_of_the_job_session_pauses_the_vm_through_the_agent(
    batch_site: BatchSite, agent: Path, libvirt_conn: Connection
) -> None:
    """Torque's contract (resmom/requests.c:resume_suspend in Torque 6.1.3): SIGTSTP to
    every process of the job's session, SIGSTOP 5 s later, SIGCONT on resume. The job
    starter is pbs_mom's child, leads its own session (start_exec.c ``setsid``), so its
    process group is orphaned and the kernel discards a default SIGTSTP: only the
    starter's own handler stops it, and the agent pauses the VM on that SIGTSTP alone.

    pbs_mom itself is played by :func:`under_a_pbs_mom`."""
    bs = batch_site
    _short_timeouts(bs)
    mom = Mom(bs, COUNTER.replace("-lt 40", "-lt 50"))
    name = domain_name(mom.job_id)
    out, err = bs.site.root / "job.out", bs.site.root / "job.err"
    mom_proc = None
    try:
        assert mom.prologue().returncode == 0
        mom_proc, starter_pid = under_a_pbs_mom(mom, out, err)
        deadline = time.monotonic() + 120
        while not (out.exists() and "count 2\n" in out.read_text()):
            assert mom_proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.2)  # polling with a deadline: the job is running
        pid = starter_pid()
        (qemu,) = [q.pid for q in find_qemus(bs.site.job_dir, QEMU) if q.name == name]

        os.killpg(os.getsid(pid), signal.SIGTSTP)  # Torque's first signal, alone
        _wait_state(libvirt_conn, name, "paused")
        os.killpg(os.getsid(pid), signal.SIGSTOP)  # and its second, 5 s later
        vcpus = _vcpu_ticks(qemu)
        time.sleep(PAUSE)  # the suspension under test: longer than every (shortened) timeout
        assert _vcpu_ticks(qemu) == vcpus
        os.killpg(os.getsid(pid), signal.SIGCONT)  # qsig -s resume
        _wait_state(libvirt_conn, name, "running")
        assert mom_proc.wait(timeout=180) == 5, err.read_text()
        counts = [x for x in out.read_text().splitlines() if x.startswith("count")]
        assert counts == [f"count {i}" for i in range(1, 51)]
        assert f"job {mom.job_id}: suspended by the scheduler; VM paused" in agent.read_text()
    finally:
        stop_under_a_pbs_mom(mom_proc, mom)
        mom.epilogue(0)
        bs.site.vmbatch("cleanup", mom.job_id)
