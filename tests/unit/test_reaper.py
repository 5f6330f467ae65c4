"""The reaper's pure parts (command lines, scheduler answers, decision rules) and one whole
pass against libvirt's test driver (no daemon, no process started)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from vmbatch import process, reaper, state, trust
from vmbatch.config import Config, LibvirtConfig, parse
from vmbatch.hooks.jobstate import FAILED, Record, StateStore, UserDir
from vmbatch.images.cache import ImageCache, Marker
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import DiskSpec, DomainSpec, JobMetadata, build_xml
from vmbatch.reaper import Job, QemuProcess, Verdict, judge

NOW = 1_000_000.0
BOOT = "this-boot"

# -- QEMU command lines ----------------------------------------------------------------------


def test_libvirts_qemu_command_line_gives_name_and_uuid() -> None:
    argv = ["/usr/bin/qemu-system-x86_64", "-name", "guest=vmbatch-42,debug-threads=on", "-S",
            "-uuid", "4BB25DA7-BD39-481A-95FA-AC99E303F19C", "-smp", "1"]  # fmt: skip
    assert reaper.qemu_identity(argv) == ("vmbatch-42", "4bb25da7-bd39-481a-95fa-ac99e303f19c")


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("vmbatch-7", "vmbatch-7"),  # -name NAME: the implied key is guest
        ("vmbatch-7,debug-threads=on", "vmbatch-7"),
        ("debug-threads=on,guest=vmbatch-7", "vmbatch-7"),
        ("guest=vmbatch-a,,b,process=x", "vmbatch-a,b"),  # ",," is a literal comma
        ("process=qemu", None),
    ],
)
def test_the_name_option_follows_qemus_option_syntax(value: str, name: str | None) -> None:
    assert reaper.qemu_identity(["qemu", "-name", value]) == (name, None)


def test_a_malformed_uuid_or_a_missing_name_is_none() -> None:
    assert reaper.qemu_identity(["qemu", "-uuid", "not-a-uuid"]) == (None, None)
    assert reaper.qemu_identity(["qemu", "-name"]) == (None, None)


def test_a_qemu_is_lost_only_if_libvirt_knows_neither_its_uuid_nor_without_uuid_its_name() -> None:
    u = str(uuid.uuid4())
    q = QemuProcess(1, "1:2:3", "vmbatch-9", u)
    assert not reaper.is_lost(q, frozenset(), frozenset({u}))
    # Same name, other UUID: a new domain of the same name; this QEMU is not its.
    assert reaper.is_lost(q, frozenset({"vmbatch-9"}), frozenset({str(uuid.uuid4())}))
    bare = QemuProcess(1, "1:2:3", "vmbatch-9", None)
    assert not reaper.is_lost(bare, frozenset({"vmbatch-9"}), frozenset())
    assert reaper.is_lost(bare, frozenset({"vmbatch-8"}), frozenset())
    assert q.job_key == "9"


# -- what the scheduler says -------------------------------------------------------------


@pytest.mark.parametrize(
    ("rc", "out", "err", "runs"),
    [
        (1, "", "slurm_load_jobs error: Invalid job id specified\n", False),
        (1, "", "slurm_load_jobs error: Unable to contact slurm controller\n", None),
        (0, "", "", None),
        (0, "RUNNING\n", "", True),
        (0, "CONFIGURING\n", "", True),
        (0, "COMPLETING\n", "", True),
        (0, "SUSPENDED\n", "", True),
        (0, "REQUEUED\n", "", True),  # completing into a requeue: the epilogue is on it
        (0, "SOME_NEW_STATE\n", "", True),  # unknown: alive
        (0, "COMPLETED\n", "", False),
        (0, "CANCELLED\n", "", False),
        (0, "NODE_FAIL\n", "", False),
        (0, "PENDING\n", "", False),  # requeued: it runs nowhere now (waiting)
        (0, "COMPLETED\nRUNNING\n", "", True),
    ],
)
def test_squeue_answers(rc: int, out: str, err: str, runs: bool | None) -> None:
    assert reaper.slurm_verdict(rc, out, err).runs is runs


def test_slurm_is_asked_until_it_fails_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def fake_run(argv: list[str], **kw: object) -> process.Result:
        calls.append(argv)
        if len(calls) == 1:
            return process.Result(tuple(argv), 0, "RUNNING\n", "")
        return process.Result(tuple(argv), 1, "", "Unable to contact slurm controller\n")

    monkeypatch.setattr(process, "run", fake_run)
    conf = tmp_path / "slurm.conf"
    assert reaper.SchedulerQuery(Config(), {"SLURM_CONF": str(conf)})("slurm", "4").runs is None
    assert calls == []  # no slurm.conf: no query (it would look up DNS SRV records)
    conf.write_text("")
    query = reaper.SchedulerQuery(Config(), {"SLURM_CONF": str(conf), "HOME": "/root"})
    assert query("slurm", "5").runs is True
    assert calls[0][1:] == ["-h", "--jobs=5", "--states=all", "--format=%T"]
    assert query("slurm", "6").runs is None
    later = query("slurm", "7")
    assert later.runs is None and "not asked" in later.reason
    assert len(calls) == 2
    assert query.env == {"SLURM_CONF": str(conf)}
    assert query("slurm", "../x").runs is None  # never on the command line
    assert query("lsf", "1").runs is None


def test_torque_asks_pbs_moms_job_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trust, "untrusted_reason", lambda p: None)
    jobs = tmp_path / "mom_priv" / "jobs"
    assert reaper.torque_verdict(jobs, "7.server").runs is None  # no pbs_mom here
    jobs.mkdir(parents=True)
    assert reaper.torque_verdict(jobs, "7.server").runs is False
    (jobs / "7.server.JB").write_text("")
    assert reaper.torque_verdict(jobs, "7.server").runs is True
    assert reaper.torque_verdict(jobs, "../7.server").runs is None
    monkeypatch.setattr(trust, "untrusted_reason", lambda p: f"{p} is writable by others")
    assert reaper.torque_verdict(jobs, "7.server").runs is None


# -- the decision rules ----------------------------------------------------------------------


def _never(scheduler: str, job_id: str) -> Verdict:
    raise AssertionError(f"the scheduler must not be asked about {scheduler} job {job_id}")


def _says(runs: bool | None) -> reaper.SchedulerCheck:
    return lambda scheduler, job_id: Verdict(runs, f"{scheduler} says {runs}")


def _judge(job: Job, ask: reaper.SchedulerCheck = _never, libvirt_ok: bool = True) -> Verdict:
    return judge(job, now=NOW, boot=BOOT, grace=600, libvirt_ok=libvirt_ok, ask=ask)


def _record(started: float, boot: str = BOOT) -> Record:
    return Record("42", "slurm", "alice", boot_id=boot, started=started)


def test_a_record_from_before_the_reboot_is_gone_without_asking() -> None:
    assert _judge(Job("42", "42", record=_record(NOW - 5, boot="old"))).runs is False


def test_a_job_inside_the_grace_is_never_touched_whatever_the_scheduler_says() -> None:
    verdict = _judge(Job("42", "42", record=_record(NOW - 599)), ask=_says(False))
    assert verdict.runs is True and "reap_grace" in verdict.reason


@pytest.mark.parametrize("runs", [True, False, None])
def test_after_the_grace_the_scheduler_decides(runs: bool | None) -> None:
    assert _judge(Job("42", "42", record=_record(NOW - 601)), ask=_says(runs)).runs is runs


def test_a_run_lives_as_long_as_its_process() -> None:
    me = state.process_identity(os.getpid())
    assert me is not None
    assert _judge(Job("run-1", owner=me, jobdir=True)).runs is True
    dead = f"{os.getpid()}:0:{state.boot_id()}"  # this PID, another start time
    assert _judge(Job("run-1", owner=dead, jobdir=True)).runs is False


def test_domains_without_records() -> None:
    run = Job("run-2", scheduler="none", domains=["vmbatch-run-2"])
    assert _judge(run).runs is False  # its files are gone: nothing else would reap it
    slurm = Job("43", scheduler="slurm", domains=["vmbatch-43"], newest=NOW - 900)
    assert _judge(slurm, ask=_says(False)).runs is False
    fresh = Job("43", scheduler="slurm", domains=["vmbatch-43"], jobdir=True, newest=NOW - 10)
    assert _judge(fresh).runs is True
    assert _judge(Job("44", unlabelled=True, domains=["vmbatch-44"])).runs is True


def test_files_alone() -> None:
    old = NOW - 3600
    assert _judge(Job("45", jobdir=True, newest=NOW - 30)).runs is True
    assert _judge(Job("45", jobdir=True, newest=old)).runs is False
    assert _judge(Job("45", jobdir=True, newest=old), libvirt_ok=False).runs is None
    assert _judge(Job("45", userdir=True, newest=old), libvirt_ok=False).runs is False


def test_a_marker_whose_writer_lives_keeps_its_job() -> None:
    me = state.process_identity(os.getpid())
    marker = Marker(Path("/x"), Path("/x.img"), "run-3", me, NOW - 3600)
    assert _judge(Job("run-3", markers=[marker], newest=NOW - 3600)).runs is True
    gone = Marker(Path("/x"), Path("/x.img"), "run-3", "1:0:x", NOW - 3600)
    assert _judge(Job("run-3", markers=[gone], newest=NOW - 3600)).runs is False


def test_a_lost_qemu_of_no_job_is_gone_at_once_but_a_live_jobs_is_kept() -> None:
    lost = QemuProcess(1, "1:2:3", "vmbatch-46", None)
    assert _judge(Job("46", lost_qemus=[lost], jobdir=True, newest=NOW)).runs is False
    rec = _record(NOW - 5)
    assert _judge(Job("46", record=rec, lost_qemus=[lost])).runs is True


# -- one whole pass (libvirt's test driver, files in tmp_path) ----------------------------------


def _cfg(tmp_path: Path, test_uri: str) -> Config:
    return parse(
        {
            "libvirt": {"uri": test_uri},
            "paths": {"job_dir": str(tmp_path / "jobs"), "cache_dir": str(tmp_path / "cache")},
            "batch": {
                "state_dir": str(tmp_path / "state"),
                "user_dir": str(tmp_path / "run"),
                "accounting_log": str(tmp_path / "acct.jsonl"),
                "reap_grace": 600,
            },
            "checkpoint": {"dir": str(tmp_path / "checkpoints")},
        }
    )


def _domain(conn: Connection, cfg: Config, job_id: str, scheduler: str, root: Path) -> str:
    name = f"vmbatch-{job_id}"
    jobdir = root / job_id
    xml = build_xml(
        DomainSpec(
            name=name,
            domain_type="qemu",
            memory_mib=128,
            vcpus=1,
            machine="q35",
            disks=(DiskSpec(jobdir / "overlay.qcow2", "qcow2"),),
            console_log=jobdir / "console.log",
            metadata=JobMetadata(job_id, "alice", scheduler, "demo", "0"),
            emulator=Path("/usr/bin/qemu-system-x86_64"),
        )
    )
    conn.create(name, xml)
    return name


def _old(path: Path) -> None:
    os.utime(path, (NOW - 3600, NOW - 3600))


def test_a_whole_pass_reaps_only_what_no_live_job_owns(tmp_path: Path, test_uri: str) -> None:
    cfg = _cfg(tmp_path, test_uri)
    store = StateStore(cfg.batch.state_dir)
    boot = state.boot_id()
    with Connection(LibvirtConfig(uri=test_uri)) as conn:
        # 50: Slurm says it ended -> reaped. 51: inside the grace -> kept. 52: Slurm unreachable.
        for job_id, started in (("50", NOW - 900), ("51", NOW - 60), ("52", NOW - 900)):
            _domain(conn, cfg, job_id, "slurm", cfg.paths.job_dir)
            (cfg.paths.job_dir / job_id).mkdir(parents=True, exist_ok=True)
            store.write(Record(job_id, "slurm", "alice", boot_id=boot, started=started))
        UserDir(cfg.batch.user_dir, "50").create(os.getuid(), os.getgid(), {"guest.json": b"{}"})
        # Another configuration's VM with a job id this node also has: not ours, not judged.
        _domain(conn, cfg, "60", "slurm", tmp_path / "elsewhere")
        # A failed prologue from before a reboot: gone, no libvirt needed.
        store.write(Record("53", "slurm", "alice", boot_id="old", phase=FAILED))
        # Files of no job: old ones go, a fresh one stays.
        for key in ("54", "55"):
            (cfg.paths.job_dir / key).mkdir(parents=True)
        _old(cfg.paths.job_dir / "54")
        # An in-use marker whose writer is gone, and one whose writer is this process.
        cache = ImageCache(cfg)
        image = cache.dir / "demo-0123456789abcdef.img"
        cache.dir.mkdir(parents=True)
        image.write_text("image")
        mine = cache.mark_used(image, "run-live")
        dead = cache.mark_used(image, "run-dead")
        dead.write_text(f"{boot}\n1:0:{boot}\n")
        _old(dead)

        def scheduler(kind: str, job_id: str) -> Verdict:
            assert kind == "slurm" and job_id in ("50", "52"), job_id
            return Verdict(None, "slurmctld down") if job_id == "52" else Verdict(False, "gone")

        dry = reaper.reap(cfg, scheduler_check=scheduler, conn=conn, dry_run=True, now=NOW)
        assert [ln.split(":")[0] for ln in dry.removed] == [
            "job 50", "job 53", "job 54", "job run-dead"]  # fmt: skip
        assert all("would " in ln for ln in dry.removed)
        assert {d.name for d in conn.list_vmbatch()} == {f"vmbatch-{i}" for i in (50, 51, 52, 60)}

        report = reaper.reap(cfg, scheduler_check=scheduler, conn=conn, now=NOW)
        assert report.removed == [
            "job 50: domain vmbatch-50 destroyed, job directory, user directory, state record"
            " removed (gone)",
            "job 53: state record removed (the node rebooted since its prologue)",
            "job 54: job directory removed (no job owns it; unchanged for 60 min)",
            "job run-dead: image in-use marker removed (no job owns it; unchanged for 60 min)",
        ]
        assert report.undecided == ["job 52: left alone: slurmctld down"]
        assert not report.ok and not report.failed
        assert {d.name for d in conn.list_vmbatch()} == {f"vmbatch-{i}" for i in (51, 52, 60)}
        assert sorted(p.name for p in cfg.paths.job_dir.iterdir()) == ["51", "52", "55"]
        assert [r.job_id for r in store.records()] == ["51", "52"]
        assert not (cfg.batch.user_dir / "50").exists()
        assert mine.exists() and not dead.exists()


def test_checkpoints_of_jobs_that_ended_for_good_go_and_a_requeued_jobs_stay(
    tmp_path: Path, test_uri: str
) -> None:
    """Checkpoints kept for a job's next run (the ``requeue`` mark) go once Slurm says the
    job ended (cancelled while it waited) or forgot it; never while it waits or runs,
    never a Torque job's, never unmarked ones (a running job's: no query for them)."""
    cfg = _cfg(tmp_path, test_uri)
    says = {
        "80": Verdict(False, "job CANCELLED in Slurm"),
        "81": Verdict(False, "job PENDING in Slurm (requeued)", waiting=True),
        "82": Verdict(True, "job RUNNING in Slurm"),  # restored on another node
        "86": Verdict(False, "job no longer known to Slurm"),
        "89": Verdict(None, "slurmctld down"),  # SchedulerQuery asks no more after this
    }
    jobs = [(j, "slurm", True) for j in says]
    jobs += [("83", "torque", True), ("84", "slurm", False), ("85", "slurm", True)]
    for job_id, scheduler, marked in jobs:
        gen = cfg.checkpoint.dir / job_id / "1"
        gen.mkdir(parents=True)
        (gen / "manifest.json").write_text(f'{{"job_id": "{job_id}", "scheduler": "{scheduler}"}}')
        if marked:
            (cfg.checkpoint.dir / job_id / "requeue").write_text("kept\n")
        if job_id != "85":  # 85 changed within the grace
            _old(cfg.checkpoint.dir / job_id)
    # What an earlier removal left (an NFS file open elsewhere): tried again after the grace.
    for left in (".gone-77-123", ".gone-78-456"):
        (cfg.checkpoint.dir / left / "1").mkdir(parents=True)
        (cfg.checkpoint.dir / left / "1" / ".nfs0001").write_text("x")
    _old(cfg.checkpoint.dir / ".gone-77-123")
    # 87: a take that never finished (no manifest says whose): left alone.
    (cfg.checkpoint.dir / "87" / ".tmp-1-99").mkdir(parents=True)
    (cfg.checkpoint.dir / "87" / "requeue").write_text("kept\n")
    _old(cfg.checkpoint.dir / "87")
    asked: list[str] = []

    def scheduler(kind: str, job_id: str) -> Verdict:
        asked.append(f"{kind} {job_id}")
        return says[job_id]

    everything = sorted(p.name for p in cfg.checkpoint.dir.iterdir())
    with Connection(LibvirtConfig(uri=test_uri)) as conn:
        dry = reaper.reap(cfg, scheduler_check=scheduler, conn=conn, dry_run=True, now=NOW)
        assert sorted(p.name for p in cfg.checkpoint.dir.iterdir()) == everything
        quick = reaper.reap(cfg, scheduler_check=scheduler, conn=conn, now=NOW, checkpoints=False)
        assert quick.removed == [] and asked == [f"slurm {j}" for j in sorted(says)]
        report = reaper.reap(cfg, scheduler_check=scheduler, conn=conn, now=NOW)
    assert [ln.split(":")[0] for ln in dry.removed] == [
        "checkpoint left-overs .gone-77-123", "checkpoints of job 80", "checkpoints of job 86"
    ]  # fmt: skip
    assert report.removed == [
        f"checkpoint left-overs .gone-77-123: {cfg.checkpoint.dir / '.gone-77-123'} removed"
        " (removed checkpoints)",
        f"checkpoints of job 80: {cfg.checkpoint.dir / '80'} removed (job CANCELLED in Slurm)",
        f"checkpoints of job 86: {cfg.checkpoint.dir / '86'} removed"
        " (job no longer known to Slurm)",
    ]
    assert report.undecided == ["checkpoints of job 89: left alone: slurmctld down"]
    assert sorted(p.name for p in cfg.checkpoint.dir.iterdir()) == [
        ".gone-78-456", "81", "82", "83", "84", "85", "87", "89"]  # fmt: skip
    assert sorted(set(asked)) == [f"slurm {j}" for j in sorted(says)]


def test_a_second_reaper_does_nothing(tmp_path: Path, test_uri: str) -> None:
    cfg = _cfg(tmp_path, test_uri)
    with reaper._alone(cfg.paths.job_dir) as first:
        assert first
        report = reaper.reap(cfg, scheduler_check=_never, now=NOW)
    assert report.skipped == ["another reaper is running; this one did nothing"]


def test_a_job_whose_lock_a_hook_holds_is_skipped(tmp_path: Path, test_uri: str) -> None:
    cfg = _cfg(tmp_path, test_uri)
    store = StateStore(cfg.batch.state_dir)
    store.write(Record("70", "slurm", "alice", boot_id="old", phase=FAILED))
    with store.exclusive("70"), Connection(LibvirtConfig(uri=test_uri)) as conn:
        report = reaper.reap(cfg, scheduler_check=_never, conn=conn, now=time.time())
    assert report.skipped == ["job 70: left alone: a vmbatch hook is working on it"]
    assert store.read("70") is not None


# -- the image cache's left-overs ------------------------------------------------------------


def test_the_cache_sweep_keeps_what_a_live_fetch_holds(tmp_path: Path, test_uri: str) -> None:
    import fcntl

    cache = ImageCache(_cfg(tmp_path, test_uri))
    d = cache.dir
    d.mkdir(parents=True)
    no_pid = int(Path("/proc/sys/kernel/pid_max").read_text())  # no process has this PID
    files = {
        ".held.img.part": "a fetch holds held.img.lock",
        ".stale.img.part": "nobody holds stale.img.lock",
        ".fresh.img.part": "nobody holds it, but it changed just now",
        f".own.img.part.{no_pid}": "a stall-takeover fetch that died",
        f".own.img.part.{os.getpid()}": "a stall-takeover fetch that runs",
        f".x.img.meta.{no_pid}": "a metadata temp file of a dead process",
        "gone.img.meta": "sidecar of an image no longer cached",
        "gone.img.lock": "its lock",
        "kept.img": "a cached image",
        "kept.img.lock": "its lock",
    }
    for name in files:
        (d / name).write_text(name)
        if name != ".fresh.img.part":
            _old(d / name)
    with (d / "held.img.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file: conflicts like another process
        dry = cache.sweep(older_than=600, now=NOW, dry_run=True)
        assert all((d / n).exists() for n in files)
        swept = cache.sweep(older_than=600, now=NOW)
    assert [s.path.name for s in swept] == [s.path.name for s in dry]
    removed = [".stale.img.part", f".own.img.part.{no_pid}", f".x.img.meta.{no_pid}"]
    removed += ["gone.img.meta", "gone.img.lock"]
    assert sorted(s.path.name for s in swept) == sorted(removed)
    # fresh.img.lock was made to lock the partial file (as a fetch would make it).
    kept = [".held.img.part", "held.img.lock", ".fresh.img.part", "fresh.img.lock"]
    kept += [f".own.img.part.{os.getpid()}", "kept.img", "kept.img.lock"]
    assert sorted(p.name for p in d.iterdir()) == sorted(kept)
    # Once the fetch that held it is gone, its partial file is abandoned too.
    later = cache.sweep(older_than=600, now=NOW)
    assert sorted(s.path.name for s in later) == [".held.img.part", "held.img.lock"]


def test_a_failed_prologues_vm_that_outlived_its_teardown_is_destroyed(
    tmp_path: Path, test_uri: str
) -> None:
    """A prologue whose teardown could not destroy its VM (libvirtd hung) records FAILED;
    the epilogue then touches only files. The reaper, with libvirt at hand, destroys it."""
    cfg = _cfg(tmp_path, test_uri)
    StateStore(cfg.batch.state_dir).write(
        Record("80", "slurm", "alice", boot_id="old", phase=FAILED)
    )
    with Connection(LibvirtConfig(uri=test_uri)) as conn:
        _domain(conn, cfg, "80", "slurm", cfg.paths.job_dir)
        report = reaper.reap(cfg, scheduler_check=_never, conn=conn, now=NOW)
        assert report.removed == [
            "job 80: domain vmbatch-80 destroyed, state record removed (the node rebooted since"
            " its prologue)"
        ]
        assert conn.list_vmbatch() == []


def test_a_vm_migrated_here_for_another_nodes_job_is_left_to_that_node() -> None:
    """No record here and a scheduler that says the job is not this node's (Torque's job
    file is on the source node): still alive, its node's epilogue ends it."""
    job = Job("42", "42", scheduler="torque", domains=["vmbatch-42"], hosted_for="node1")
    verdict = _judge(job, ask=_says(False))
    assert verdict.runs is True and "node1's epilogue ends it" in verdict.reason
    job.hosted_for = ""
    assert _judge(job, ask=_says(False)).runs is False
