"""Pure parts of the batch hooks: scheduler formats, state records, the user directory;
Torque's precancel against the fake SSH client of :mod:`tests.unit.fakessh`."""

from __future__ import annotations

import io
import json
import os
import types
from pathlib import Path

import pytest

from tests.unit.conftest import FakeClock
from tests.unit.fakessh import FakeGuest
from vmbatch import config
from vmbatch.errors import GuestLostError, HostError, JobBusyError, JobError
from vmbatch.guest import ssh
from vmbatch.hooks import batch, entry, jobstate, slurm, torque
from vmbatch.hooks.accounting import JobEnd
from vmbatch.hooks.jobstate import READY, Record, StateStore, UserDir


@pytest.mark.parametrize(
    ("text", "cpus"), [("4", 4), ("4(x2)", 4), ("2(x3),1", 2), ("", None), ("x", None)]
)
def test_slurm_cpus_per_node(text: str, cpus: int | None) -> None:
    assert slurm.cpus_on_node(text) == cpus


@pytest.mark.parametrize(
    ("code", "pair"), [("7:0", (7, 0)), ("0:15", (0, 15)), ("0:0", (0, 0)), ("", None), ("7", None)]
)
def test_the_epilogs_exit_code2_is_status_and_signal(
    code: str, pair: tuple[int, int] | None
) -> None:
    end = slurm.epilog_end({"SLURM_JOB_EXIT_CODE2": code})
    assert (end and (end.exit_status, end.exit_signal)) == pair
    assert end is None or end.source == "epilog environment"


def test_slurm_bundle_gives_args_env_and_cwd(tmp_path: Path) -> None:
    config = {
        "process": {
            "args": ["/spool/job1/slurm_script", "a b"],
            "env": ["A=1=2", "B=", "junk"],
            "cwd": "/home/u",
        }
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    args, env, cwd = slurm.bundle_process(tmp_path)
    assert args == ("/spool/job1/slurm_script", "a b")
    assert env == {"A": "1=2", "B": ""} and cwd == "/home/u"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HostError, match="RunTimeRun"):
        slurm.bundle_process(tmp_path)


def test_slurm_allocated_memory_and_time_limit() -> None:
    assert slurm.tres_memory_mib("cpu=2,mem=1000M,node=1,billing=2") == 1000
    assert slurm.tres_memory_mib("cpu=1,mem=2G,node=1") == 2048
    assert slurm.tres_memory_mib("cpu=1,node=1") is None
    # The whole job's memory: each node's VM gets its node's share (--mem is per node).
    assert slurm.tres_memory_mib("cpu=4,mem=8G,node=2,billing=4") == 4096
    assert slurm.slurm_time("5:00") == 300
    assert slurm.slurm_time("1:02:03") == 3723
    assert slurm.slurm_time("2-00:00:01") == 172801
    assert slurm.slurm_time("UNLIMITED") == 0


def test_torque_epilogue_args_and_starter_stdin() -> None:
    argv = [
        "epilogue",
        "12.srv",
        "alice",
        "g",
        "n",
        "4242",
        "nodes=1",
        "cput=1",
        "q",
        "",
        "7",
        "/x.SC",
    ]
    assert torque.epilogue_args(argv) == torque.EpilogueArgs("12.srv", "alice", 7, "4242")
    assert torque.epilogue_args(argv[:3]) == torque.EpilogueArgs("12.srv", "alice", None, None)
    garbled = [*argv[:10], "x", *argv[11:]]
    assert torque.epilogue_args(garbled).exit_status is None
    with pytest.raises(JobError, match="expected 11 arguments"):
        torque.epilogue_args(["epilogue"])
    path, args = torque.starter_command(io.BytesIO(b"/spool/12.SC a 'b c'\nignored\n"))
    assert (path, args) == ("/spool/12.SC", ("a", "b c"))
    with pytest.raises(HostError, match="job_starter"):
        torque.starter_command(io.BytesIO(b""))


@pytest.mark.parametrize("job_id", ["123", "12.server.example", "7[3].srv", "4_1"])
def test_job_ids_accepted(job_id: str) -> None:
    assert batch.check_job_id(job_id) == job_id


@pytest.mark.parametrize("job_id", ["", "../x", "1;rm", "a b", ".hidden", "x" * 101])
def test_odd_job_ids_refused(job_id: str) -> None:
    with pytest.raises(JobError, match="does not accept"):
        batch.check_job_id(job_id)


def test_record_round_trip_and_atomic_store(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    rec = Record("9", "slurm", "alice", uid=5, gid=6, phase=READY, boot_seconds=1.5)
    store.write(rec)
    assert store.read("9") == rec
    assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["9.json"]  # no temp left
    store.path("bad").write_text("{not json")
    assert store.read("bad") is None
    store.remove("9")
    assert store.read("9") is None


def test_exclusive_refuses_a_second_holder(tmp_path: Path) -> None:
    """flock conflicts between open file descriptions, also within one process."""
    store = StateStore(tmp_path)
    with store.exclusive("1"):
        with pytest.raises(JobBusyError, match="another vmbatch hook is working on job 1"):
            with store.exclusive("1", wait=0):
                pass
        with store.exclusive("2"):
            pass
    with store.exclusive("1"):
        pass


def test_lock_goes_with_the_record_and_a_replaced_lock_file_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path)
    lock = tmp_path / "1.lock"
    with store.exclusive("1"):
        store.write(Record("1", "slurm", "u"))
    assert lock.exists(), "the record lives on: so does its lock"
    with store.exclusive("1"):
        store.remove("1")
    assert not lock.exists() and list(tmp_path.iterdir()) == []
    # A holder removes and a new hook recreates the lock file between our open and flock:
    # the lock we then get is on the old inode and must not count.
    real_flock = jobstate.fcntl.flock
    calls = []

    def racing_flock(fd: int, op: int) -> None:
        if not calls:
            lock.unlink()
            lock.write_bytes(b"")
        calls.append(fd)
        real_flock(fd, op)

    lock.write_bytes(b"")
    monkeypatch.setattr(jobstate.fcntl, "flock", racing_flock)
    with store.exclusive("1"):
        assert len(calls) == 2, "retried on the path's new inode"
        held = os.fstat(calls[-1])
        assert (held.st_ino, held.st_dev) == (lock.stat().st_ino, lock.stat().st_dev)


def _finish_cfg(tmp_path: Path) -> object:
    from vmbatch.config import parse

    return parse(
        {
            "paths": {"job_dir": str(tmp_path / "jobs"), "cache_dir": str(tmp_path / "cache")},
            "libvirt": {"uri": "test:///nowhere"},
            "batch": {
                "state_dir": str(tmp_path / "state"),
                "user_dir": str(tmp_path / "run"),
                "accounting_log": str(tmp_path / "acct.jsonl"),
            },
        }
    )


def test_epilogue_and_cleanup_never_tear_down_under_a_running_prologue(tmp_path: Path) -> None:
    cfg = _finish_cfg(tmp_path)
    store = StateStore(tmp_path / "state")
    store.write(Record("9", "slurm", "u", phase="failed"))
    with store.exclusive("9"):  # a prologue holds the job
        with pytest.raises(JobBusyError):
            batch.finish(cfg, "9", lock_wait=0)  # type: ignore[arg-type]
        assert store.read("9") is not None
    batch.finish(cfg, "9")  # type: ignore[arg-type]
    assert store.read("9") is None and list((tmp_path / "state").iterdir()) == []


def test_a_user_directory_root_cannot_remove_is_a_warning_after_the_vm_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 13: the user dir was removed first, and its failure raised: VM and record
    leaked. Now the job's VM and files go first, and a stuck user dir is only logged."""
    cfg = _finish_cfg(tmp_path)
    store = StateStore(tmp_path / "state")
    store.write(Record("8", "slurm", "u", phase="failed"))
    jobdir = tmp_path / "jobs" / "8"
    jobdir.mkdir(parents=True)
    UserDir(tmp_path / "run", "8").create(os.getuid(), os.getgid(), {UserDir.KEY: b"k"})
    order = []
    real_rmtree = jobstate.shutil.rmtree

    def stuck(path: Path, **kw: object) -> None:
        order.append(("user dir", jobdir.exists()))

    monkeypatch.setattr(jobstate, "shutil", types.SimpleNamespace(rmtree=stuck))
    batch.finish(cfg, "8", account=True)  # type: ignore[arg-type]
    assert order == [("user dir", False)], "the job's own files were gone first"
    assert "could not remove the job's directory" in caplog.text
    assert store.read("8") is None and (tmp_path / "acct.jsonl").exists()
    real_rmtree(tmp_path / "run" / "8")


def test_mount_points_under_a_path_deepest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    info = (
        "36 25 0:32 / /run/vmbatch/7 rw - tmpfs tmpfs rw\n"
        "37 36 0:33 / /run/vmbatch/7/a\\040b/c rw - fuse.x x rw\n"
        "38 36 0:34 / /run/vmbatch/77 rw - fuse.x x rw\n"
    )
    monkeypatch.setattr(jobstate.Path, "read_text", lambda self: info)
    assert jobstate.mounts_under(Path("/run/vmbatch/7")) == [
        Path("/run/vmbatch/7/a b/c"),
        Path("/run/vmbatch/7"),
    ]


def test_user_dir_is_handed_over_last_and_replaced_whole(tmp_path: Path) -> None:
    ud = UserDir(tmp_path / "run", "5")
    uid, gid = os.getuid(), os.getgid()
    ud.create(uid, gid, {UserDir.KEY: b"secret", UserDir.GUEST: b'{"port": 1}'})
    assert oct(ud.path.stat().st_mode & 0o777) == "0o700"
    assert oct((ud.path / UserDir.KEY).stat().st_mode & 0o777) == "0o600"
    assert ud.guest() == {"port": 1}
    ud.create(uid, gid, {UserDir.ERROR: b"no"})
    assert ud.read(UserDir.KEY) is None and ud.read(UserDir.ERROR) == b"no"
    ud.remove()
    ud.remove()
    assert not ud.path.exists()


def test_workdir_only_when_the_guest_has_it() -> None:
    from vmbatch.config import parse

    cfg = parse(
        {
            "vm": {"outbound_network": True},
            "mounts": {"d": {"source": "nfs://h/e", "path": "/data"}},
        }
    )
    assert batch.guest_workdir(cfg, "/data/u/run") == "/data/u/run"
    assert batch.guest_workdir(cfg, "/data") == "/data"
    assert batch.guest_workdir(cfg, "/datax/u") is None
    assert batch.guest_workdir(cfg, "/tmp/submit") is None


def test_unknown_user_fails_the_job_and_the_epilogue_finishes_without_libvirt(
    tmp_path: Path,
) -> None:
    from vmbatch.config import parse
    from vmbatch.hooks.request import Resources

    cfg = parse(
        {
            "paths": {"job_dir": str(tmp_path / "jobs")},
            "libvirt": {"uri": "test:///nowhere"},
            "batch": {
                "default_image": "demo",
                "state_dir": str(tmp_path / "state"),
                "user_dir": str(tmp_path / "run"),
                "accounting_log": str(tmp_path / "acct.jsonl"),
            },
            "images": {"demo": {"source": "/nonexistent/demo.qcow2"}},
        }
    )
    bj = batch.BatchJob("slurm", "77", "no-such-user-here", Resources())
    error = batch.prologue(cfg, bj)
    assert isinstance(error, JobError) and "does not exist on this node" in str(error)
    record = StateStore(cfg.batch.state_dir).read("77")
    assert record is not None and record.phase == "failed" and record.uid == -1
    assert not (tmp_path / "run" / "77").exists()  # nobody to hand a directory to
    # The prologue had cleaned up.
    batch.finish(cfg, "77", end=JobEnd(65, 0, "slurmctld"), account=True)
    assert StateStore(cfg.batch.state_dir).read("77") is None
    (line,) = (tmp_path / "acct.jsonl").read_text().splitlines()
    assert json.loads(line)["cause"].startswith("JobError: user 'no-such-user-here'")


# -- Torque's epilogue.precancel ------------------------------------------------------


def _precancel_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, guest: FakeGuest, *, port_open: bool = True
) -> config.Config:
    """A job whose user directory points at ``guest``; logins and port checks go to it."""
    cfg = config.parse(
        {
            "batch": {"user_dir": str(tmp_path / "run"), "precancel_timeout": 30.0},
            "ssh": {"connect_timeout": 0.01},  # the bound on a hung command, in real time
        }
    )
    info = {"job_id": "9.srv", "host": "127.0.0.1", "port": 2222, "user": "u", "host_key": "k"}
    UserDir(cfg.batch.user_dir, "9.srv").create(
        os.getuid(),
        os.getgid(),
        {UserDir.KEY: b"private key", UserDir.GUEST: json.dumps(info).encode()},
    )
    ports: list[tuple[str, int]] = []

    def connect(endpoint: ssh.Endpoint) -> object:
        assert (endpoint.host, endpoint.port, endpoint.user) == ("127.0.0.1", 2222, "u")
        return guest.connect()

    def check_port(host: str, port: int) -> bool:
        guest.tick()
        ports.append((host, port))
        return port_open

    monkeypatch.setattr(ssh, "connect", connect)
    monkeypatch.setattr(batch, "_port_open", check_port)
    return cfg


def test_precancel_sends_sigterm_and_closes_its_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    guest = FakeGuest()
    batch.precancel(_precancel_site(tmp_path, monkeypatch, guest), "9.srv")
    assert guest.logins == 1 and clock.sleeps == []
    (command,) = guest.commands
    assert "kill -s TERM" in command and "/var/tmp/vmbatch-9.srv/pid" in command
    assert not guest.transports[0].is_active()


def test_precancel_to_a_guest_that_crashed_during_qdel_gives_up_after_backing_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    """The spin: every login comes back on a connection that has already closed. Each
    attempt logs in afresh, waits grow between attempts, and precancel_timeout ends it."""
    guest = FakeGuest(login="closed")
    cfg = _precancel_site(tmp_path, monkeypatch, guest)
    with pytest.raises(GuestLostError, match="stopped answering"):
        batch.precancel(cfg, "9.srv")
    assert 4 <= guest.logins <= 12
    assert len(clock.sleeps) == guest.logins - 2  # between the reconnect attempts
    assert all(s > 0 for s in clock.sleeps) and clock.sleeps == sorted(clock.sleeps)
    assert all(not t.is_active() for t in guest.transports)
    assert guest.commands == []


def test_precancel_to_a_hung_guest_cuts_each_command_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    guest = FakeGuest(exec_="hang")
    cfg = _precancel_site(tmp_path, monkeypatch, guest)
    with pytest.raises(GuestLostError, match=r"did not finish a command within 0\.01s"):
        batch.precancel(cfg, "9.srv")
    assert 4 <= guest.logins <= 12
    assert len(guest.commands) == guest.logins  # one bounded try per login
    assert len(clock.sleeps) == guest.logins - 2


def test_precancel_stops_at_once_when_the_vm_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    guest = FakeGuest(login="refused")
    cfg = _precancel_site(tmp_path, monkeypatch, guest, port_open=False)
    with pytest.raises(GuestLostError, match="the VM stopped"):
        batch.precancel(cfg, "9.srv")
    assert guest.logins == 1 and clock.sleeps == []


def test_precancel_hook_exits_0_when_the_guest_never_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    """What pbs_mom sees: the hook returns, with status 0 (a failure marks the node down)."""
    guest = FakeGuest(exec_="drop")
    cfg = _precancel_site(tmp_path, monkeypatch, guest)
    monkeypatch.setattr(config, "load", lambda *args, **kw: cfg)
    monkeypatch.setattr(entry, "_logging", lambda script, job_id: None)
    argv = ["vmbatch-epilogue", "--precancel", "9.srv", "u", "u", "job"]
    assert entry.run_epilogue(argv, {}) == 0
    assert 4 <= guest.logins <= 12


def test_finish_releases_an_image_marker_the_record_never_named(tmp_path: Path) -> None:
    """Issue 13: a prologue SIGKILLed after marking its cached image in use, before its
    record named the image, left the marker forever (the image was never evictable)."""
    from vmbatch.images.cache import ImageCache

    cfg = _finish_cfg(tmp_path)
    cache = ImageCache(cfg)  # type: ignore[arg-type]
    image = cache.dir / "demo-0123456789abcdef.img"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"")
    cache.mark_used(image, "6")
    StateStore(tmp_path / "state").write(Record("6", "slurm", "u"))  # no image_path yet
    assert [e.jobs for e in cache.entries()] == [("6",)]
    from vmbatch.config import LibvirtConfig
    from vmbatch.libvirt.connection import Connection

    conn = Connection(LibvirtConfig(uri="test:///default")).open()
    try:
        batch.finish(cfg, "6", conn=conn)  # type: ignore[arg-type]
    finally:
        conn.close()
    assert [e.jobs for e in cache.entries()] == [()]


def test_the_epilogue_outlasts_a_libvirtd_that_hangs_past_one_call_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    """Found by bench/soak.py: with libvirtd SIGSTOPped a little longer than
    [libvirt].timeout, the Epilog's first connection timed out and it gave up at once (the
    node drained, the record kept) instead of trying again until teardown_timeout like the
    destroy; the job's VM ran on after libvirtd resumed."""
    from vmbatch.config import LibvirtConfig
    from vmbatch.errors import LibvirtTimeoutError
    from vmbatch.libvirt.connection import Connection

    cfg = _finish_cfg(tmp_path)
    StateStore(tmp_path / "state").write(Record("7", "slurm", "u", phase=READY))
    opened: list[str] = []

    class Hung:
        def open(self) -> Connection:
            raise LibvirtTimeoutError("libvirt did not connect to test:///nowhere within 10s")

    def connection(_: object) -> object:
        opened.append("hung" if not opened else "answers")
        return Hung() if opened[-1] == "hung" else Connection(LibvirtConfig(uri="test:///default"))

    monkeypatch.setattr(batch, "Connection", connection)
    batch.finish(cfg, "7")  # type: ignore[arg-type]
    assert opened == ["hung", "answers"] and clock.sleeps == [1.0]
    assert StateStore(tmp_path / "state").read("7") is None


# -- Slurm job steps (issue 15) ---------------------------------------------------------


def test_step_names_from_oci_conf_percent_s() -> None:
    from vmbatch.hooks import slurm

    assert slurm.step_name("") is None and slurm.step_name("4294967291") is None  # batch
    assert slurm.step_name("4294967290") == "interactive"
    assert slurm.step_name("0") == "0" and slurm.step_name("12") == "12"
    for bad in ("-1", "1;id", "x", "1" * 11):
        with pytest.raises(HostError, match="RunTimeRun must end with"):
            slurm.step_name(bad)


def test_a_step_sends_scripts_by_content_and_runs_commands_by_name(tmp_path: Path) -> None:
    from vmbatch.hooks import slurm

    (tmp_path / "job.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (tmp_path / "a.out").write_bytes(b"\x7fELF...")
    assert slurm.step_program(("./job.sh", "x"), str(tmp_path)) == (
        b"#!/bin/sh\necho hi\n",
        ("x",),
    )
    assert slurm.step_program((f"{tmp_path}/job.sh",), None)[0] == b"#!/bin/sh\necho hi\n"
    # A binary, a bare name (even if the cwd holds such a file: exec uses PATH), a missing
    # path, and a directory are all left to the guest.
    (tmp_path / "hostname").write_bytes(b"#!/bin/sh\necho not-me\n")
    for args in (("./a.out",), ("hostname",), ("./nope",), (str(tmp_path),)):
        assert slurm.step_program(args, str(tmp_path)) == (None, args)


def test_task_prolog_refuses_a_step_outside_the_vm_of_a_job_that_has_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmbatch.hooks import entry

    users = tmp_path / "users"
    conf = tmp_path / "vmbatch.toml"
    conf.write_text(f'[batch]\nuser_dir = "{users}"\n')
    spool = tmp_path / "spool"
    bundle = spool / "oci-job00042-00003"
    bundle.mkdir(parents=True)
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    argv = ["vmbatch-starter", "--config", str(conf), "slurm-taskprolog"]
    env = {"SLURM_JOB_ID": "42"}

    monkeypatch.chdir(elsewhere)
    assert entry.run_starter(argv, env) == 0  # no VM for job 42 here: not ours to judge
    (users / "42").mkdir(parents=True)
    assert entry.run_starter(argv, env) == 1
    out = capsys.readouterr().out
    assert out.startswith("print vmbatch: error: this step of job 42 would run on the node")
    monkeypatch.chdir(bundle)  # a container step's task: in the VM
    assert entry.run_starter(argv, env) == 0
    for name in ("oci-job00043-00003", "oci-job00042-x"):  # another job's; not a bundle
        (spool / name).mkdir()
        monkeypatch.chdir(spool / name)
        assert entry.run_starter(argv, env) == 1
    spool.chmod(0o777)  # a directory anyone could have made it in
    monkeypatch.chdir(bundle)
    assert entry.run_starter(argv, env) == 1
    spool.chmod(0o755)
    assert entry.run_starter(argv, {}) == 0  # not a Slurm job


def test_the_step_comes_from_the_bundle_copy_when_oci_conf_passes_no_step_id() -> None:
    from vmbatch.hooks import slurm

    def name(d: str) -> str | None:
        return slurm.step_name(slurm.step_of_bundle(Path("/spool") / d))

    assert name("oci-job00042-00003") == "3" and name("oci-job00042-batch") is None
    assert name("oci-job1234567-interactive") == "interactive"
    assert name("somewhere-else") is None  # not slurmstepd's copy: the batch script


def test_a_slurm_batch_step_without_its_vm_is_requeued_then_held_not_failed(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Slurm 22.05 may rerun a requeued job without its Prolog: the starter finds no VM."""
    import json

    from vmbatch.hooks import entry

    conf = tmp_path / "vmbatch.toml"
    conf.write_text(f'[batch]\nuser_dir = "{tmp_path / "users"}"\nmax_requeues = 2\n')
    bundle = tmp_path / "oci-job00042-batch"
    bundle.mkdir()
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")

    def run(restarts: str, step: str = "4294967291") -> int:
        process = {"args": [str(script)], "env": [f"SLURM_RESTART_COUNT={restarts}"]}
        (bundle / "config.json").write_text(json.dumps({"process": process}))
        argv = ["vmbatch-starter", "--config", str(conf), "slurm", "42", str(bundle), step]
        return entry.run_starter(argv, {})

    assert run("0") == 199
    assert "vmbatch requeued the job (run 1 of at most 3)" in capfd.readouterr().err
    assert run("2") == 200
    assert "is held" in capfd.readouterr().err
    assert run("0", step="3") == 75  # a step of an allocation: fails, nothing to requeue
    assert "no VM was prepared for job 42" in capfd.readouterr().err
