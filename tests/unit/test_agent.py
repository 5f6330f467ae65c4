"""The node agent (vmbatch/agent.py): which processes are a job's tasks, when a job counts
as suspended, and one sweep pausing and continuing a VM (libvirt's test driver).

The process tables here are written as /proc would show them (proc(5): ``stat``,
``status``, ``cmdline``, ``environ``, the ``exe`` link), so the trust rules can be tried
with processes no test could start (a root slurmstepd, a user faking one). The real
kernel's view: tests/integration/test_agent_proc.py; the real Slurm:
tests/system/test_suspend.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.unit.test_ops import TORQUE_ID, Site, domain_xml
from vmbatch import agent, pausing
from vmbatch.hooks.jobstate import READY, Record, StateStore, UserDir
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import domain_name

ALICE, MALLORY = 4711, 4712


def _proc(
    root: Path,
    pid: int,
    ppid: int,
    uid: int,
    *,
    state: str = "S",
    exe: str = "/usr/bin/python3",
    cmdline: str = "x",
    environ: dict[str, str] | None = None,
    start: int = 1000,
) -> None:
    d = root / str(pid)
    d.mkdir()
    rest = [state, str(ppid)] + ["0"] * 17 + [str(start)] + ["0"] * 30
    (d / "stat").write_text(f"{pid} (a (b) c) {' '.join(rest)}\n")
    (d / "status").write_text(f"Name:\tx\nState:\t{state}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (d / "cmdline").write_bytes(cmdline.encode() + b"\0")
    (d / "environ").write_bytes(b"".join(f"{k}={v}\0".encode() for k, v in (environ or {}).items()))
    (d / "exe").symlink_to(exe)


def _slurm_table(proc: Path) -> None:
    stepd = "/usr/sbin/slurmstepd"
    _proc(proc, 100, 1, 0, exe=f"{stepd}-wlm", cmdline="slurmstepd: [42.batch]")  # Debian's
    _proc(proc, 101, 100, ALICE)  # the batch step's task: the job starter
    _proc(proc, 102, 100, MALLORY)  # another uid under the same slurmstepd: not the job's
    _proc(proc, 110, 1, 0, exe=stepd, cmdline="slurmstepd: [42.0]")
    _proc(proc, 111, 110, ALICE)  # an srun step's task
    _proc(proc, 120, 1, 0, exe=stepd, cmdline="slurmstepd: [42.extern]")
    _proc(proc, 121, 120, ALICE)  # Slurm's own sleep of the extern step
    _proc(proc, 130, 1, 0, exe=stepd, cmdline="slurmstepd: [421.batch]")
    _proc(proc, 131, 130, ALICE)  # another job whose id starts the same
    # A user's process that calls itself slurmstepd of job 42, even with the right exe name.
    _proc(proc, 200, 1, ALICE, exe=stepd, cmdline="slurmstepd: [42.batch]")
    _proc(proc, 201, 200, ALICE)


def test_a_slurm_jobs_tasks_are_the_children_of_its_root_slurmstepds_with_its_uid(
    tmp_path: Path,
) -> None:
    _slurm_table(tmp_path)
    record = Record(job_id="42", scheduler="slurm", user="alice", uid=ALICE)
    assert sorted(t.pid for t in agent.find_tasks(record, tmp_path)) == [101, 111]
    other = Record(job_id="42", scheduler="slurm", user="mallory", uid=MALLORY)
    assert [t.pid for t in agent.find_tasks(other, tmp_path)] == [102]


def test_a_torque_jobs_tasks_are_pbs_moms_children_with_its_id_and_uid(tmp_path: Path) -> None:
    _proc(tmp_path, 500, 1, 0, exe="/usr/sbin/pbs_mom", cmdline="/usr/sbin/pbs_mom")
    _proc(tmp_path, 501, 500, ALICE, environ={"PBS_JOBID": TORQUE_ID, "HOME": "/h"})
    _proc(tmp_path, 502, 500, ALICE, environ={"PBS_JOBID": "9.other"})
    _proc(tmp_path, 503, 500, MALLORY, environ={"PBS_JOBID": TORQUE_ID})  # not alice
    _proc(tmp_path, 600, 1, ALICE, exe="/usr/sbin/pbs_mom")  # a user's "pbs_mom"
    _proc(tmp_path, 601, 600, ALICE, environ={"PBS_JOBID": TORQUE_ID})
    record = Record(job_id=TORQUE_ID, scheduler="torque", user="alice", uid=ALICE)
    assert [t.pid for t in agent.find_tasks(record, tmp_path)] == [501]


def test_a_job_is_suspended_when_every_task_is_stopped_or_frozen(tmp_path: Path) -> None:
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    _proc(proc, 1, 0, ALICE, state="T")
    _proc(proc, 2, 0, ALICE, state="S")
    _proc(proc, 3, 0, ALICE, state="S")
    (proc / "2" / "cgroup").write_text("0::/system.slice/slurmstepd.scope/job_42/step_batch\n")
    (proc / "3" / "cgroup").write_text("7:freezer:/slurm/uid_4711/job_42\n3:cpu,cpuacct:/\n")
    v2 = cgroup / "system.slice/slurmstepd.scope/job_42/step_batch"
    v1 = cgroup / "freezer/slurm/uid_4711/job_42"
    v2.mkdir(parents=True)
    v1.mkdir(parents=True)
    (v2 / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    (v1 / "freezer.state").write_text("THAWED\n")
    tasks = [p for pid in (1, 2, 3) if (p := agent.read_proc(pid, proc)) is not None]

    def suspended() -> bool:
        return all(t.state == "T" or agent.frozen(t.pid, proc, cgroup) for t in tasks)

    assert not suspended() and not agent.suspended([], proc)
    (v2 / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    assert not suspended()
    (v1 / "freezer.state").write_text("FROZEN\n")
    assert suspended()


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path, [domain_xml("42", "alice", tmp_path / "jobs")])


def test_a_sweep_pauses_a_suspended_jobs_vm_and_continues_it_on_resume(
    site: Site, tmp_path: Path
) -> None:
    from vmbatch import config

    proc = tmp_path / "proc"
    proc.mkdir()
    _slurm_table(proc)
    store = StateStore(site.state_dir)
    store.write(Record(job_id="42", scheduler="slurm", user="alice", uid=ALICE, phase=READY,
                       domain=domain_name("42")))  # fmt: skip
    cfg = config.load(site.config)
    sweeper = agent.Agent(cfg, proc=proc)
    note = UserDir(site.user_dir, "42")

    def restate(state: str) -> None:
        for pid in (101, 111):
            stat = proc / str(pid) / "stat"
            text = stat.read_text()
            head, _, rest = text.rpartition(") ")
            stat.write_text(f"{head}) {state}{rest[1:]}")

    def record() -> Record:
        rec = store.read("42")
        assert rec is not None
        return rec

    with Connection(cfg.libvirt) as conn:
        assert sweeper.sweep(conn) == []  # tasks run: nothing to do
        restate("T")
        assert sweeper.sweep(conn) == ["job 42: suspended by the scheduler; VM paused"]
        assert (status := conn.status(domain_name("42"))) and status.state == "paused"
        assert record().pauses == (pausing.SCHEDULER,)
        assert note.read_paused() == (True, 1)
        assert sweeper.sweep(conn) == []  # still suspended: nothing more
        # An operator pauses it too; the scheduler's resume leaves it paused.
        pausing.add(cfg, store, conn, record(), pausing.OPERATOR)
        restate("S")
        assert sweeper.sweep(conn) == ["job 42: resumed by the scheduler"]
        assert (status := conn.status(domain_name("42"))) and status.state == "paused"
        assert record().pauses == (pausing.OPERATOR,)
        pausing.drop(cfg, store, conn, record(), pausing.OPERATOR)
        assert (status := conn.status(domain_name("42"))) and status.state == "running"
        assert note.read_paused() == (False, 1)
        # A job whose hook holds its lock (the epilogue runs) is left for the next sweep.
        restate("T")
        with store.exclusive("42"):
            assert sweeper.sweep(conn) == []
        assert (status := conn.status(domain_name("42"))) and status.state == "running"


def test_only_the_jobs_own_starter_or_root_may_ask_for_its_checkpoint(
    site: Site, tmp_path: Path
) -> None:
    """The agent's socket (vmbatch agent): who asks is what the kernel says (SO_PEERCRED's
    pid and uid); the request names the job."""
    import threading

    from vmbatch import config

    proc = tmp_path / "proc"
    proc.mkdir()
    _slurm_table(proc)
    store = StateStore(site.state_dir)
    store.write(Record(job_id="42", scheduler="slurm", user="alice", uid=ALICE, phase=READY,
                       domain=domain_name("42")))  # fmt: skip
    taken: list[str] = []

    def take(job_id: str) -> str:
        taken.append(job_id)
        return "checkpoint 1 written in 0.5s"

    requests = agent.Requests(config.load(site.config), threading.Event(), take, proc)
    ask = b'{"job": "42", "request": "checkpoint"}\n'
    assert requests._answer(ask, 101, ALICE) == {
        "ok": True, "message": "checkpoint 1 written in 0.5s"}  # fmt: skip
    assert requests._answer(ask, 101, ALICE) == {  # a loop of SIGUSR2 does not fill the disk
        "ok": False,
        "message": "the job's last checkpoint is less than 300s old (at most one in that time)",
    }
    assert requests._answer(ask, 0, 0)["ok"] is True  # root
    refusals = {
        (102, MALLORY): "job 42 is not yours",
        (201, ALICE): "only job 42's own starter may ask for its checkpoint",  # fake stepd
        (131, ALICE): "only job 42's own starter may ask for its checkpoint",  # job 421's
    }
    for (pid, uid), why in refusals.items():
        assert requests._answer(ask, pid, uid) == {"ok": False, "message": why}
    assert requests._answer(b'{"job": "43", "request": "checkpoint"}', 101, ALICE) == {
        "ok": False, "message": "job 43 has no running VM on this node"}  # fmt: skip
    for garbage in (b"", b"{", b'{"job": "42"}', b'["42"]', b'{"job": "42", "request": "x"}'):
        assert requests._answer(garbage, 101, ALICE) == {
            "ok": False, "message": "not a request vmbatch knows"}  # fmt: skip
    assert taken == ["42", "42"]


def test_a_checkpoint_cut_off_by_its_process_dying_is_settled(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vmbatch checkpoint` holds the job's lock throughout; the `checkpoint` pause reason
    with a free lock means its process died: the agent makes the VM whole and continues
    it, or, if the save had ended the VM, tells the starter it stopped and keeps the
    checkpoints. (The test driver has no QEMU monitor: the forwards are stand-ins.)"""
    from vmbatch import config
    from vmbatch.state import JobDir

    with site.config.open("a") as fh:
        fh.write(f'[checkpoint]\ndir = "{tmp_path / "checkpoints"}"\n')
    cfg = config.load(site.config)
    store = StateStore(site.state_dir)
    proc = tmp_path / "proc"
    proc.mkdir()
    jobdir = JobDir(cfg.paths.job_dir, "42")
    jobdir.keys.mkdir(parents=True)
    jobdir.login.write_text('{"port": 1111, "user": "alice"}\n')
    forwards: list[tuple[int, int]] = []
    limits: list[int] = []

    def forward(self: Connection, name: str, guest: int) -> int:
        forwards.append((2222, guest))
        return 2222

    monkeypatch.setattr(Connection, "forwards", lambda self, name: list(forwards))
    monkeypatch.setattr(Connection, "forward_port", forward)
    monkeypatch.setattr(Connection, "limit_memory", lambda self, name, mib: limits.append(mib))
    sweeper = agent.Agent(cfg, proc=proc)
    rec = Record(job_id="42", scheduler="slurm", user="alice", uid=ALICE, phase=READY,
                 domain=domain_name("42"), pauses=(pausing.CHECKPOINT,),
                 memory_limit_mib=600)  # fmt: skip
    userdir = UserDir(site.user_dir, "42")
    with Connection(cfg.libvirt) as conn:
        store.write(rec)
        with store.exclusive("42"):  # the checkpoint still runs: left alone
            assert sweeper.sweep(conn) == []
        # Cut off right after the restore: a paused QEMU without limit and SSH forward.
        conn.suspend(domain_name("42"))
        done = sweeper.sweep(conn)
        assert done == ["job 42: cut-off checkpoint taken back, SSH on port 2222"]
        assert (status := conn.status(domain_name("42"))) and status.state == "running"
        assert (after := store.read("42")) is not None and after.pauses == ()
        assert limits == [600] and forwards == [(2222, cfg.ssh.port)]
        assert json.loads(jobdir.login.read_bytes())["port"] == 2222  # `vmbatch ssh`
        note = userdir.read_note()
        assert (note.paused, note.port, note.stopped) == (False, 2222, False)  # the starter
        # Cut off after the forward was added, before the starter heard of it: not a
        # second forward, the one there is told.
        forwards[:] = [(3333, cfg.ssh.port)]
        store.write(rec)
        conn.suspend(domain_name("42"))
        done = sweeper.sweep(conn)
        assert done == ["job 42: cut-off checkpoint taken back, SSH on port 3333"]
        assert forwards == [(3333, cfg.ssh.port)] and limits == [600, 600]
        assert userdir.read_note().port == 3333
        assert json.loads(jobdir.login.read_bytes())["port"] == 3333
        # The save had ended the VM: the starter is told it stopped, the checkpoints stay.
        store.write(dataclasses.replace(rec, domain="vmbatch-gone"))
        assert sweeper.sweep(conn) == ["job 42: cut-off checkpoint; its VM is gone, job requeued"]
        note = userdir.read_note()
        assert note.stopped and userdir.read_paused()[0] is False
        assert (tmp_path / "checkpoints" / "42" / "requeue").exists()


def test_a_job_whose_vm_is_gone_never_holds_up_the_others_and_notes_follow_records(
    site: Site, tmp_path: Path
) -> None:
    """One job's libvirt error is that job's (logged once), the next job is still paused;
    a record whose VM is gone is settled; a pause note that disagrees with its record (a
    crash between the two writes) is rewritten."""
    from vmbatch import config

    proc = tmp_path / "proc"
    proc.mkdir()
    stepd = "/usr/sbin/slurmstepd"
    for job, pid in (("41", 300), ("42", 100)):
        _proc(proc, pid, 1, 0, exe=stepd, cmdline=f"slurmstepd: [{job}.batch]")
        _proc(proc, pid + 1, pid, ALICE, state="T" if job == "42" else "S")
    store = StateStore(site.state_dir)
    # Job 41: recorded paused by the scheduler, its tasks run again, but its VM is gone.
    store.write(Record(job_id="41", scheduler="slurm", user="alice", uid=ALICE, phase=READY,
                       domain="vmbatch-gone", pauses=(pausing.SCHEDULER,)))  # fmt: skip
    store.write(Record(job_id="42", scheduler="slurm", user="alice", uid=ALICE, phase=READY,
                       domain=domain_name("42")))  # fmt: skip
    cfg = config.load(site.config)
    sweeper = agent.Agent(cfg, proc=proc)
    with Connection(cfg.libvirt) as conn:
        done = sweeper.sweep(conn)
        assert done == ["job 41: its VM is gone", "job 42: suspended by the scheduler; VM paused"]
        assert (status := conn.status(domain_name("42"))) and status.state == "paused"
        assert (gone := store.read("41")) is not None and gone.pauses == ()
        # The note of job 42 lost (a crash after the record was written): rewritten.
        note = UserDir(site.user_dir, "42")
        note.write_paused(False, 1)
        assert sweeper.sweep(conn) == []
        assert note.read_paused() == (True, 2)
