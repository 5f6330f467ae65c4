"""`vmbatch checkpoint` against a real job VM (tiny guest, real libvirtd/QEMU), with the
hooks called as pbs_mom calls them (tests/system/test_torque.py's ``Mom``).

The job counts in the guest's memory (a shell variable) and prints a random run id first:
a job restored from a checkpoint goes on with the same run id and counter, while one
started afresh would print a new id and count from 1 again.

Each run of the job gets its host CPUs from a pbs_mom cpuset the test makes (a cgroup v1
cpuset, as pbs_mom makes one): a run restored from a checkpoint is pinned to its own
allocation's CPUs, not to those of the run that was saved.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.system.conftest import BatchSite, SlurmSite, running_agent
from tests.system.slurmhooks import vmbatch_cluster
from tests.system.test_limits import QEMU, _thread_cpus
from tests.system.test_suspend import stop_under_a_pbs_mom, under_a_pbs_mom
from tests.system.test_torque import BIN, Mom
from vmbatch import checkpoint, config
from vmbatch.hooks.jobstate import StateStore, UserDir
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import domain_name
from vmbatch.reaper import find_qemus
from vmbatch.state import safe_job_id

COUNT = 60


def counter(count: int = COUNT) -> str:
    return (
        "#!/bin/sh\necho run $(cat /proc/sys/kernel/random/uuid)\ni=0\n"
        f"while [ $i -lt {count} ]; do i=$((i+1)); echo $i; sleep 0.2; done\nexit 3\n"
    )


REQUEUE_EXIT = 199  # [batch].requeue_exit's default


class Starter:
    """The job starter as pbs_mom runs it, its stdout in a file read while it runs."""

    def __init__(self, mom: Mom, out: Path) -> None:
        self.out = out
        u = mom.bs.user
        env = {
            "PBS_JOBID": mom.job_id,
            "PBS_O_WORKDIR": str(u.home),
            "HOME": str(u.home),
            "USER": u.name,
            "PATH": "/bin:/usr/bin",
            **mom.bs.env,
        }
        with out.open("wb") as stdout:
            self.proc = subprocess.Popen(
                [str(BIN / "vmbatch-starter"), "/bin/sh"],
                env=env,
                cwd=u.home,
                stdin=subprocess.PIPE,
                stdout=stdout,
                stderr=subprocess.PIPE,
                user=u.uid,
                group=u.gid,
                extra_groups=[],
            )
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{mom.script}\n".encode())
        self.proc.stdin.close()
        self.proc.stdin = None

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def wait_lines(self, n: int, timeout: float = 120) -> list[str]:
        """Until the job's output has ``n`` complete lines (polled, with a deadline)."""
        deadline = time.monotonic() + timeout
        while len(lines := self.lines()) < n or not self.out.read_text().endswith("\n"):
            assert self.proc.poll() is None, self.finish()
            assert time.monotonic() < deadline, lines
            time.sleep(0.1)
        return lines

    def finish(self) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=300)
        return self.proc.returncode, err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=30)


def _arm(bs: BatchSite, point: str | None) -> None:
    dropin = bs.site.root / "vmbatch.d" / "90-faults.toml"
    dropin.parent.mkdir(exist_ok=True)
    if point is None:
        dropin.unlink(missing_ok=True)
    else:
        dropin.write_text(f'[debug]\nfault_points = ["{point}"]\nfault_action = "kill"\n')


def _generation(res: subprocess.CompletedProcess[bytes]) -> int:
    assert res.returncode == 0, res.stderr.decode()
    found = re.search(rb"checkpoint (\d+) of job", res.stdout)
    assert found, res.stdout
    return int(found[1])


def _counted(lines: list[str], run: str) -> list[int]:
    """The counter's values after the run id line (which must be ``run``)."""
    assert lines[0] == run, lines[:3]
    return [int(x) for x in lines[1:]]


def test_checkpoints_continue_stop_and_restore_the_jobs_memory_and_survive_a_kill(
    batch_site: BatchSite,
    libvirt_conn: Connection,
    tmp_path: Path,
    torque_cpuset: Callable[[str], Path],
) -> None:
    bs = batch_site
    mom = Mom(bs, counter())
    cfg = config.load(bs.site.config, honour_env=False)
    base = bs.checkpoints / safe_job_id(mom.job_id)
    name = domain_name(mom.job_id)
    cpus = torque_cpuset(mom.job_id)
    starters: list[Starter] = []
    try:
        cpus.write_text("0")  # the job's first run has host CPU 0 (pbs_mom's cpuset)
        assert mom.prologue().returncode == 0
        assert _pinning(libvirt_conn, name) == "0"
        a = Starter(mom, tmp_path / "a.out")
        starters.append(a)
        run = a.wait_lines(4)[0]
        assert run.startswith("run ")

        # --continue (the default): the job runs on, its starter follows it to the new port.
        gen1 = _generation(bs.site.vmbatch("checkpoint", mom.job_id))
        modes = {stat.S_IMODE(p.stat().st_mode) for p in base.rglob("*")}
        assert modes == {0o700, 0o600} and stat.S_IMODE(base.stat().st_mode) == 0o700
        manifest = json.loads((base / str(gen1) / "manifest.json").read_bytes())
        assert manifest["base_image"]["sha256"] == checkpoint.sha256(bs.site.base_image)
        assert manifest["machine"].startswith("pc-q35-") and manifest["image"] == "demo"
        at = len(a.lines())
        lines = a.wait_lines(at + 5)
        assert _counted(lines, run) == list(range(1, len(lines)))

        # SIGKILL while the next checkpoint is written (after the VM's save and the disk
        # copies, before the manifest): the previous one stays the one to restore.
        _arm(bs, "checkpoint.files_written")
        killed = bs.site.vmbatch("checkpoint", "--stop", mom.job_id)
        _arm(bs, None)
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
        assert {p.name for p in base.iterdir()} == {
            str(gen1),
            f".tmp-{gen1 + 1}-{killed_pid(killed)}",
            "requeue",
        }
        found = checkpoint.newest_valid(cfg, mom.job_id)
        assert found.checkpoint is not None and found.checkpoint.generation == gen1
        assert [r.reason for r in found.refused] == ["unfinished (its writer was stopped); removed"]
        assert {p.name for p in base.iterdir()} == {str(gen1), "requeue"}
        a.kill()  # its VM is gone: the scheduler requeues the job, the epilogue keeps it
        assert mom.epilogue(256 + signal.SIGKILL).returncode == 0
        assert {p.name for p in base.iterdir()} == {str(gen1), "requeue"}

        # The next run restores checkpoint 1: same run, counting on from where it was, on
        # the CPU of this run's allocation, not on the one it was saved on.
        cpus.write_text("1")
        pro = mom.prologue()
        assert pro.returncode == 0, pro.stderr.decode()
        assert f"restored from checkpoint {gen1}".encode() in pro.stderr, pro.stderr.decode()
        assert _pinning(libvirt_conn, name) == "1"
        assert set(_thread_cpus(_qemu_pid(bs, name)).values()) == {frozenset({1})}
        b = Starter(mom, tmp_path / "b.out")
        starters.append(b)
        counted = _counted(b.wait_lines(at + 8), run)
        assert counted == list(range(1, len(counted) + 1))

        # --stop: the starter exits for a requeue; the next run continues from it.
        gen2 = _generation(bs.site.vmbatch("checkpoint", "--stop", mom.job_id))
        status, err = b.finish()
        assert status == REQUEUE_EXIT, err
        assert "checkpointed and stopped" in err
        stopped_at = len(b.lines())
        assert mom.epilogue(REQUEUE_EXIT).returncode == 0
        assert {p.name for p in base.iterdir()} == {str(gen2), "requeue"}
        pro = mom.prologue()
        assert f"restored from checkpoint {gen2}".encode() in pro.stderr, pro.stderr.decode()
        c = Starter(mom, tmp_path / "c.out")
        starters.append(c)
        # Its first lines are the ones the stopped VM had written: replayed, not rerun.
        assert c.wait_lines(stopped_at + 3)[:stopped_at] == b.lines()[:stopped_at]

        # --continue on a restored VM, its process SIGKILLed right after libvirt restored
        # the VM: a new QEMU, paused, without the memory limit and the SSH forward (QEMU
        # saves neither), whose port the starter never heard of.
        _arm(bs, "checkpoint.restored")
        killed = bs.site.vmbatch("checkpoint", "--continue", mom.job_id)
        _arm(bs, None)
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
        assert libvirt_conn.ssh_port(name, cfg.ssh.port) is None
        assert _hard_limit_kib(libvirt_conn, name) >= 2**40  # unlimited
        # The node agent settles it: the VM made whole, and the job completes, its output
        # whole and once.
        with running_agent(bs.site) as agent_log:
            deadline = time.monotonic() + 60
            while b"cut-off checkpoint taken back" not in agent_log.read_bytes():
                assert time.monotonic() < deadline, agent_log.read_text()
                time.sleep(0.1)  # polling with a deadline: the agent's next sweep
            port = libvirt_conn.ssh_port(name, cfg.ssh.port)
            assert port is not None, agent_log.read_text()
            record = StateStore(bs.state_dir).read(mom.job_id)
            assert record is not None and record.memory_limit_mib, record
            assert _hard_limit_kib(libvirt_conn, name) == record.memory_limit_mib * 1024
            assert UserDir(bs.user_dir, mom.job_id).read_note().port == port
            status, err = c.finish()
            assert status == 3, err
            assert _counted(c.lines(), run) == list(range(1, COUNT + 1))
            ssh = bs.site.vmbatch("ssh", mom.job_id, "--", "echo", "ssh-ok")  # root's login
            assert (ssh.returncode, ssh.stdout) == (0, b"ssh-ok\n"), ssh.stderr.decode()
        assert _pinning(libvirt_conn, name) == "1"
        assert mom.epilogue(3).returncode == 0
        assert not base.exists()  # the job ended for good: its checkpoints went with it
    finally:
        _arm(bs, None)
        for starter in starters:
            starter.kill()
        mom.epilogue(0)
        bs.site.vmbatch("cleanup", mom.job_id)
        if base.exists():
            (base / "requeue").unlink(missing_ok=True)
            bs.site.vmbatch("cleanup", mom.job_id)


CPUSET = Path("/sys/fs/cgroup/cpuset")


@pytest.fixture
def torque_cpuset() -> Iterator[Callable[[str], Path]]:
    """Makes pbs_mom's cpuset for a job as pbs_mom does: the cgroup v1 cpuset
    ``torque/<job id>`` (:func:`vmbatch.hooks.torque.cpuset_files`); returns its
    ``cpuset.cpus``, which the test writes before each run (that run's allocation). Only
    read by the prologue: no process is put into it. Removed afterwards."""
    if not (CPUSET / "cpuset.cpus").is_file():
        pytest.fail("needs a cgroup v1 cpuset hierarchy at /sys/fs/cgroup/cpuset")
    parent = CPUSET / "torque"
    made = not parent.exists()
    jobs: list[Path] = []

    def make(job_id: str) -> Path:
        parent.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):  # a child's CPUs must be its parent's
            if not (parent / knob).read_text().strip():
                (parent / knob).write_text((CPUSET / knob).read_text())
        jobs.append(parent / job_id)
        jobs[-1].mkdir()
        return jobs[-1] / "cpuset.cpus"

    yield make
    for job in jobs:
        job.rmdir()
    if made:
        with contextlib.suppress(OSError):  # another test's job cpuset may be in it
            parent.rmdir()


def _pinning(conn: Connection, name: str) -> str | None:
    """The running domain's ``<vcpu cpuset>`` (None: not pinned)."""
    vcpu = ET.fromstring(conn.xml(name)).find("vcpu")
    assert vcpu is not None
    return vcpu.get("cpuset")


def _qemu_pid(bs: BatchSite, name: str) -> int:
    (pid,) = [q.pid for q in find_qemus(bs.site.job_dir, QEMU) if q.name == name]
    return pid


def _hard_limit_kib(conn: Connection, name: str) -> int:
    """The domain's memory hard limit (libvirt's memory cgroup), KiB; 2**53-1 unlimited."""
    return int(conn.raw.lookupByName(name).memoryParameters(0)["hard_limit"])


def killed_pid(res: subprocess.CompletedProcess[bytes]) -> int:
    """The pid the fault injection logged (``SIGKILL at POINT (pid N)``)."""
    found = re.search(rb"SIGKILL at \S+ \(pid (\d+)\)", res.stderr)
    assert found, res.stderr
    return int(found[1])


def test_a_checkpoint_whose_overlay_changed_is_refused_and_the_job_starts_afresh(
    batch_site: BatchSite, tmp_path: Path
) -> None:
    bs = batch_site
    mom = Mom(bs, counter(20))
    base = bs.checkpoints / safe_job_id(mom.job_id)
    starters: list[Starter] = []
    try:
        assert mom.prologue().returncode == 0
        a = Starter(mom, tmp_path / "a.out")
        starters.append(a)
        run = a.wait_lines(3)[0]
        gen = _generation(bs.site.vmbatch("checkpoint", "--stop", mom.job_id))
        assert a.finish()[0] == REQUEUE_EXIT
        assert mom.epilogue(REQUEUE_EXIT).returncode == 0
        overlay = base / str(gen) / "disks" / "overlay.qcow2"
        with overlay.open("r+b") as fh:  # one byte changed, size the same
            fh.seek(overlay.stat().st_size // 2)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0xFF]))
        reason = "disks/overlay.qcow2 was modified after the checkpoint was taken"

        # on_bad = "hold": the job is held, with the reason in its output; nothing boots.
        dropin = bs.site.root / "vmbatch.d" / "30-checkpoint.toml"
        dropin.parent.mkdir(exist_ok=True)
        dropin.write_text('[checkpoint]\non_bad = "hold"\n')
        pro = mom.prologue()
        assert pro.returncode == 0 and reason.encode() in pro.stderr, pro.stderr.decode()
        held = Starter(mom, tmp_path / "held.out")
        starters.append(held)
        status, err = held.finish()
        assert status == 200 and reason in err and "held" in err, err  # [batch].hold_exit
        assert mom.epilogue(200).returncode == 0
        assert (base / str(gen)).is_dir()  # kept for the admin

        # on_bad = "fresh": refused the same way, and the job boots afresh.
        dropin.write_text('[checkpoint]\non_bad = "fresh"\n')
        pro = mom.prologue()
        assert pro.returncode == 0, pro.stderr.decode()
        assert reason.encode() in pro.stderr and b"starts afresh" in pro.stderr
        fresh = Starter(mom, tmp_path / "fresh.out")
        starters.append(fresh)
        status, err = fresh.finish()
        assert status == 3, err
        lines = fresh.lines()
        assert lines[0].startswith("run ") and lines[0] != run  # a new run
        assert [int(x) for x in lines[1:]] == list(range(1, 21))
        assert mom.epilogue(3).returncode == 0
        assert not base.exists()
    finally:
        for starter in starters:
            starter.kill()
        mom.epilogue(0)
        if base.exists():
            (base / "requeue").unlink(missing_ok=True)
            bs.site.vmbatch("cleanup", mom.job_id)


def test_sigusr2_checkpoints_the_vm_through_the_agent_and_reaches_the_job(
    batch_site: BatchSite, agent: Path
) -> None:
    """[checkpoint].usr2 = "checkpoint" (the default): SIGUSR2 to the job's starter (what
    ``scancel -b -s USR2`` and ``sbatch --signal=B:USR2@T`` send) has the node agent write a
    checkpoint, the VM runs on from it, and the job gets the signal too (its trap runs)."""
    bs = batch_site
    script = counter().replace("i=0\n", "trap 'echo got-usr2' USR2\ni=0\n", 1)
    mom = Mom(bs, script)
    base = bs.checkpoints / safe_job_id(mom.job_id)
    out, err_file = bs.site.root / "usr2.out", bs.site.root / "usr2.err"
    mom_proc = None
    try:
        assert mom.prologue().returncode == 0
        mom_proc, starter_pid = under_a_pbs_mom(mom, out, err_file)
        deadline = time.monotonic() + 120
        while len(lines := out.read_text().splitlines() if out.exists() else []) < 5:
            assert mom_proc.poll() is None and time.monotonic() < deadline, err_file.read_text()
            time.sleep(0.1)  # polling with a deadline: the job is running
        run = lines[0]
        os.kill(starter_pid(), signal.SIGUSR2)  # what scancel -b -s USR2 does
        while not list(base.glob("*/manifest.json")):
            assert mom_proc.poll() is None and time.monotonic() < deadline, agent.read_text()
            time.sleep(0.2)  # polling with a deadline: the agent writes the checkpoint
        assert mom_proc.wait(timeout=180) == 3, err_file.read_text()
        err = err_file.read_text()
        lines = out.read_text().splitlines()
        assert "got-usr2" in lines, lines
        assert _counted([x for x in lines if x != "got-usr2"], run) == list(range(1, COUNT + 1))
        assert "SIGUSR2: checkpoint 1 written" in err, err
        assert "checkpoint 1 written" in agent.read_text()
    finally:
        stop_under_a_pbs_mom(mom_proc, mom)
        mom.epilogue(0)
        bs.site.vmbatch("cleanup", mom.job_id)


def test_a_slurm_job_checkpointed_by_sigusr2_then_requeued_continues_from_its_checkpoint(
    batch_site: BatchSite, agent: Path
) -> None:
    """Through the real Slurm 22.05: ``scancel -b -s USR2`` has the agent checkpoint the
    job's VM (the job runs on), then ``scontrol requeue`` (what preemption with
    ``PreemptMode=REQUEUE`` does) ends the run. The Epilog keeps the checkpoint (slurmctld
    counts one run more than the Prolog saw), and the job's next run restores it: the same
    run id, the counter going on from where the checkpoint was taken, the output complete
    and once. Its checkpoints go when it ends for good (``settled`` checks).

    The cluster's credentials live 5 s (``cred_expire``): Slurm holds a requeued job back for
    that long (120 s by default) before it may start again."""
    bs = batch_site
    script = (
        "#!/bin/sh\ntrap 'echo got-usr2' USR2\necho run $(cat /proc/sys/kernel/random/uuid)\n"
        "i=0\nwhile [ $i -lt 80 ]; do i=$((i+1)); echo count $i; sleep 0.2; done\nexit 3\n"
    )
    with vmbatch_cluster(
        bs.site.root, bs.site.config, cred_expire=5,
        extra_conf=["SchedulerParameters=sched_interval=1"],
    ) as cluster:  # fmt: skip
        slurm = SlurmSite(bs, cluster)
        job_id = slurm.submit(script)
        out = bs.user.home / f"slurm-{job_id}.out"
        base = bs.checkpoints / safe_job_id(job_id)
        deadline = time.monotonic() + 180

        def wait_for(what: Callable[[], bool]) -> None:
            while not what():
                assert time.monotonic() < deadline, (cluster.job(job_id), agent.read_text())
                time.sleep(0.2)  # polling with a deadline

        wait_for(lambda: out.exists() and "count 5\n" in out.read_text())
        [run] = [x for x in out.read_text().splitlines() if x.startswith("run ")]
        scancel = subprocess.run(
            ["scancel", "-b", "-s", "USR2", job_id], env=cluster.env(), capture_output=True,
            text=True, timeout=30, check=False,
        )  # fmt: skip
        assert scancel.returncode == 0, scancel.stderr
        wait_for(lambda: "got-usr2\n" in out.read_text())  # forwarded after the checkpoint
        assert [p.name for p in base.glob("*/manifest.json")] == ["manifest.json"]
        cluster.scontrol("requeue", job_id)
        job = slurm.settled(job_id, timeout=240)
        assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "3:0", "1")
        lines = slurm.output(job_id).splitlines()
        assert [x for x in lines if x.startswith("run ")] == [run], lines  # restored, not new
        counts = [x for x in lines if x.startswith("count ")]
        assert counts == [f"count {i}" for i in range(1, 81)], lines
        assert "DRAIN" not in cluster.node()["State"]
