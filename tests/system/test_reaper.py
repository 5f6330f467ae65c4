"""`vmbatch cleanup --stale` (the reaper, vmbatch/reaper.py) reaps what nothing live owns and
never touches a live job: a SIGKILLed `vmbatch run`'s VM, a QEMU process libvirt lost, a
batch job Slurm no longer knows (past the grace only), a dead fetcher's partial download.

Real parts: libvirtd and QEMU, a single-node Slurm (tests/system/slurmcluster.py) for
squeue's answers, the vmbatch command line, the image cache's flock protocol with real
`vmbatch image pull` processes against the fault-injecting HTTP server.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.integration.httpserver import Resource, Server, serve
from tests.system.conftest import BatchSite, Site, site_domains
from tests.system.slurmcluster import SlurmCluster
from vmbatch import state
from vmbatch.hooks.jobstate import READY, Record, StateStore, UserDir
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import DomainSpec, JobMetadata, build_xml, domain_name

QEMU = "/usr/bin/qemu-system-x86_64"


def _started(proc: subprocess.Popen[bytes]) -> None:
    """Wait until the job runs in its VM (its first output line)."""
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"running\n"


def _private_state(site: Site) -> None:
    """State and user directories of this test's own (not the machine's defaults)."""
    site.write(
        f'\n[batch]\nstate_dir = "{site.root / "state"}"\nuser_dir = "{site.root / "run"}"\n'
        f'accounting_log = "{site.root / "accounting.jsonl"}"\n'
    )


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


def test_the_next_prologue_reaps_what_a_killed_run_left(
    batch_site: BatchSite, libvirt_conn: Connection
) -> None:
    """Issue 14: the reaper's cheap pass runs at the start of each prologue, so a node
    without the timer still loses a SIGKILLed run's VM at its next job."""
    site = batch_site.site
    doomed = site.popen("run", "--image", "demo", "--", "sh", "-c", "echo running; sleep 600")
    try:
        _started(doomed)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=30)
        assert len(site_domains(libvirt_conn, site.root)) == 1
        user = batch_site.user.name
        hook = Path(sys.executable).with_name("vmbatch-prologue")
        # A Torque prologue for a job that names no image: it boots nothing itself.
        script = site.root / "5.srv.SC"
        script.write_text("#!/bin/sh\n#VMBATCH image=nosuch\ntrue\n")
        argv = [str(hook), "--config", str(site.config), "5.srv", user, user, "j", "", "q", ""]
        pro = subprocess.run([*argv, str(script)], capture_output=True, timeout=300, check=False)
        assert pro.returncode == 0, pro.stderr.decode()
        assert b"reaper: removed 1 leftover(s)" in pro.stderr, pro.stderr.decode()
        assert site_domains(libvirt_conn, site.root) == set()
        assert not site.job_dir.exists() or not any(site.job_dir.iterdir())
        epi = Path(sys.executable).with_name("vmbatch-epilogue")
        done = subprocess.run(
            [str(epi), "--config", str(site.config), "5.srv", user, user, "j", "", "", "", "0"],
            capture_output=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
    finally:
        if doomed.poll() is None:
            doomed.kill()
        doomed.communicate(timeout=60)


# -- QEMU processes libvirt does not know ----------------------------------------------------


def _qemu(name: str, log_dir: Path, guest_uuid: str) -> subprocess.Popen[bytes]:
    """A QEMU started directly (not by libvirt), paused before it runs anything, with a
    file in ``log_dir`` on its command line as libvirt's QEMUs have their disks."""
    return subprocess.Popen(
        [QEMU, "-name", f"guest={name},debug-threads=on", "-uuid", guest_uuid,
         "-machine", "none", "-display", "none", "-nodefaults", "-S",
         "-chardev", f"file,id=log0,path={log_dir}/console.log"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip


def test_a_qemu_libvirt_lost_is_killed_and_unrelated_ones_are_left_alone(
    site: Site, libvirt_conn: Connection
) -> None:
    _private_state(site)
    tag = uuid.uuid4().hex[:8]
    key = f"reapertest-{tag}"
    jobdir = site.job_dir / key
    jobdir.mkdir(parents=True)
    elsewhere = site.root / "other-config-jobs" / key
    elsewhere.mkdir(parents=True)
    lost_uuid = str(uuid.uuid4())
    lost = _qemu(f"vmbatch-{key}", jobdir, lost_uuid)
    # Not a vmbatch name, though its files are in this configuration's job directory.
    unrelated = _qemu(f"reapertest-other-{tag}", jobdir, str(uuid.uuid4()))
    # A vmbatch name, but another configuration's job directory: not this reaper's.
    foreign = _qemu(f"vmbatch-{key}-foreign", elsewhere, str(uuid.uuid4()))
    procs = (lost, unrelated, foreign)
    try:
        dry = site.vmbatch("cleanup", "--stale", "--dry-run")
        assert dry.returncode == 0, dry.stderr.decode()
        assert dry.stdout.decode().splitlines() == [
            f"job {key}: would kill QEMU process {lost.pid} (vmbatch-{key})"
            f" (libvirt knows no domain with UUID {lost_uuid})",
            f"job {key}: would remove job directory (no job owns it any more and libvirt lost"
            " its QEMU process)",
        ]
        assert all(p.poll() is None for p in procs) and jobdir.exists()

        done = site.vmbatch("cleanup", "--stale")
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.decode().splitlines() == [
            line.replace("would kill QEMU process", "QEMU process")
            .replace(f"(vmbatch-{key}) (", f"(vmbatch-{key}) killed (")
            .replace("would remove job directory", "job directory removed")
            for line in dry.stdout.decode().splitlines()
        ]
        assert lost.wait(timeout=30) == -signal.SIGKILL
        assert unrelated.poll() is None and foreign.poll() is None
        assert not jobdir.exists() and elsewhere.exists()
        again = site.vmbatch("cleanup", "--stale")
        assert (again.returncode, again.stdout) == (0, b""), again.stderr.decode()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)


# -- batch jobs the scheduler no longer runs --------------------------------------------------


def _batch_job(bs: BatchSite, conn: Connection, job_id: str, started: float) -> str:
    """What a prologue leaves for a running job: its state record, job and user directories
    and a domain with the job's metadata (started paused: nothing of it needs to boot)."""
    site = bs.site
    name = domain_name(job_id)
    jobdir = state.JobDir(site.job_dir, job_id).create()
    user = bs.user
    UserDir(bs.user_dir, job_id).create(user.uid, user.gid, {UserDir.GUEST: b"{}"})
    StateStore(bs.state_dir).write(
        Record(
            job_id,
            "slurm",
            user.name,
            user.uid,
            user.gid,
            phase=READY,
            image="demo",
            domain=name,
            jobdir=str(jobdir.path),
            boot_id=state.boot_id(),
            prologue_pid=os.getpid(),
            started=started,
        )
    )
    xml = build_xml(
        DomainSpec(
            name=name,
            domain_type="qemu",
            memory_mib=64,
            vcpus=1,
            machine="q35",
            disks=(),
            console_log=jobdir.console_log,
            metadata=JobMetadata(job_id, user.name, "slurm", "demo", "test"),
            emulator=Path(QEMU),
        )
    )
    conn.raw.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
    return name


def test_a_batch_job_slurm_no_longer_knows_is_reaped_only_after_the_grace(
    batch_site: BatchSite, libvirt_conn: Connection
) -> None:
    site = batch_site.site
    site.write("reap_grace = 600\n")  # (appended to the [batch] section)
    # Job ids no other test uses: domain names are per libvirtd, and finish also destroys
    # a domain of the same job id elsewhere. gone and young: ids this Slurm never had.
    base = 10_000_000 + secrets.randbelow(50_000_000)
    gone, young = str(base + 1000), str(base + 1001)
    with SlurmCluster(extra_conf=[f"FirstJobId={base}"]) as cluster:
        home = cluster.dir / "home"
        alive = cluster.sbatch("#!/bin/sh\nsleep 600\n", "root", home)
        cluster.wait_job(alive, {"RUNNING"})
        hour_ago = time.time() - 3600
        names = {
            job_id: _batch_job(batch_site, libvirt_conn, job_id, started)
            for job_id, started in ((gone, hour_ago), (young, time.time()), (alive, hour_ago))
        }
        env = {**os.environ, "SLURM_CONF": str(cluster.conf)}
        try:
            # Slurm cannot be asked (an empty slurm.conf: squeue fails at once, sends
            # nothing): nothing is touched, and the exit status says so.
            empty = site.root / "empty-slurm.conf"
            empty.touch()
            blind = site.vmbatch("cleanup", "--stale", env={**env, "SLURM_CONF": str(empty)})
            assert (blind.returncode, blind.stdout) == (75, b""), blind.stderr.decode()
            # Jobs are judged in job id order: alive < gone (same number of digits).
            err = blind.stderr.decode()
            assert f"job {alive}: left alone: cannot ask Slurm: squeue:" in err
            assert f"job {gone}: left alone: Slurm not asked" in err  # once is enough
            assert young not in err  # within the grace: Slurm not even asked

            dry = site.vmbatch("cleanup", "--stale", "--dry-run", env=env)
            assert dry.returncode == 0, dry.stderr.decode()
            why = "(job no longer known to Slurm)"
            assert dry.stdout.decode().splitlines() == [
                f"job {gone}: would destroy domain {names[gone]}, remove job directory, user"
                f" directory, state record {why}"
            ]
            assert site_domains(libvirt_conn, site.root) == set(names.values())

            done = site.vmbatch("cleanup", "--stale", env=env)
            assert done.returncode == 0, done.stderr.decode()
            assert done.stdout.decode().splitlines() == [
                f"job {gone}: domain {names[gone]} destroyed, job directory, user directory,"
                f" state record removed {why}"
            ]
            assert site_domains(libvirt_conn, site.root) == {names[young], names[alive]}
            left = sorted(p.name for p in batch_site.leftovers())
            assert left == sorted([f"{young}.json", f"{alive}.json", young, alive, young, alive])
            assert cluster.job(alive)["JobState"] == "RUNNING"
        finally:
            # The epilogue's work for the two live ones (the fixture checks nothing is left).
            finish = site.vmbatch("cleanup", young, alive, gone)
            assert finish.returncode == 0, finish.stderr.decode()
    assert not batch_site.records()  # cleanup writes no accounting line


# -- the image cache -------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[Server]:
    with serve() as s:
        yield s


def test_a_dead_fetchers_partial_download_goes_and_a_live_fetchers_stays(
    site: Site, server: Server
) -> None:
    """Two `vmbatch image pull`s stall mid-download; one is SIGKILLed (the kernel drops its
    lock), the other still fetches (holds its lock). Both partial files are made to look
    an hour old: only the lock tells them apart."""
    _private_state(site)
    body = os.urandom(1 << 20)
    digest = hashlib.sha256(body).hexdigest()
    for name in ("dead", "live"):
        # Stall after 512 KiB: two of the downloader's 256 KiB reads reach the partial file.
        server.resources[f"/{name}.img"] = Resource(body, stall_after=512 << 10, stall_seconds=120)
        site.write(
            f'\n[images.{name}]\nsource = "{server.url(f"/{name}.img")}"\nsha256 = "{digest}"\n'
            'format = "raw"\n'
        )
    cache = site.root / "cache" / "images"
    key = digest[:16]
    parts = {n: cache / f".{n}-{key}.img.part" for n in ("dead", "live")}
    pulls = {n: site.popen("image", "pull", n) for n in ("dead", "live")}
    try:
        deadline = time.monotonic() + 60
        while not all(p.exists() and p.stat().st_size >= 512 << 10 for p in parts.values()):
            assert time.monotonic() < deadline, "the pulls wrote no partial file"
            assert all(p.poll() is None for p in pulls.values())
            time.sleep(0.1)  # polling with a deadline
        pulls["dead"].kill()
        pulls["dead"].wait(timeout=30)
        hour_ago = time.time() - 3600
        for part in parts.values():
            os.utime(part, (hour_ago, hour_ago))
        with (cache / f"live-{key}.img.lock").open() as lock, pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the live pull holds it

        done = site.vmbatch("cleanup", "--stale")
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.decode().splitlines() == [
            f"image cache: partial download .dead-{key}.img.part removed (no process fetches"
            " it; unchanged for 60 min)",
            f"image cache: lock file dead-{key}.img.lock removed (its image is not in the"
            " cache; nobody holds it)",
        ]
        assert not parts["dead"].exists() and parts["live"].exists()
        assert pulls["live"].poll() is None
    finally:
        for proc in pulls.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)


# -- injection appliances, without libvirt ---------------------------------------------------

#: A `vmbatch run` as far as its offline injection (the run's owner file first, as
#: lifecycle.start_vm writes it), in a child process that the test SIGKILLs.
INJECTING_RUN = """
import os, sys
from pathlib import Path
from tests.integration.test_inject import SPEC
from vmbatch import config, state
from vmbatch.contextualize import get_method

cfg = config.load(Path(sys.argv[1]))
jobdir = state.JobDir(cfg.paths.job_dir, "run-reapertest")
jobdir.write(jobdir.owner, (state.process_identity(os.getpid()) or "").encode(), 0o644)
get_method("inject", cfg).prepare(SPEC, jobdir)
"""


def _no_libvirt_config(tmp_path: Path, base: Path) -> Path:
    """Files in tmp_path, and a libvirt that does not answer (no socket at that path)."""
    (tmp_path / "cache").mkdir(exist_ok=True)
    path = tmp_path / "vmbatch.toml"
    path.write_text(
        f'[libvirt]\nuri = "qemu+unix:///system?socket={tmp_path}/no-libvirtd.sock"\n'
        f'[paths]\njob_dir = "{tmp_path / "jobs"}"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[batch]\nstate_dir = "{tmp_path / "state"}"\nuser_dir = "{tmp_path / "run"}"\n'
        f'[images.x]\nsource = "{base}"\nformat = "raw"\n'
    )
    return path


def test_the_appliance_of_a_killed_injection_is_stopped_without_libvirt(tmp_path: Path) -> None:
    """A `vmbatch run` SIGKILLed while guestfish runs its appliance leaves the appliance
    (root) running; libvirtd is unreachable; the reaper still stops the appliance, as its
    job is gone, and leaves the rest (the VM cannot be made sure of) for later."""
    from tests.integration.test_inject import _appliance_qemu, _ext4_without_os, _tmp_litter
    from vmbatch import config, process, reaper
    from vmbatch.images.catalog import resolve
    from vmbatch.images.disks import create_overlay
    from vmbatch.lifecycle import teardown

    path = _no_libvirt_config(tmp_path, _ext4_without_os(tmp_path))
    cfg = config.load(path)
    jobdir = state.JobDir(cfg.paths.job_dir, "run-reapertest").create()
    create_overlay(cfg, resolve(cfg, "x"), jobdir.overlay)
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", INJECTING_RUN, str(path)], cwd=root)
    fds: dict[int, int] = {}  # PID -> pidfd of every appliance process
    litter: list[Path] = []
    try:
        deadline = time.monotonic() + 180  # building the appliance, then starting QEMU
        while (qemu := _appliance_qemu(jobdir.overlay)) is None:
            assert child.poll() is None, "the injection ended before its appliance ran"
            assert time.monotonic() < deadline, "the appliance's QEMU never started"
            time.sleep(0.05)  # polling with a deadline
        (tag_file,) = jobdir.path.glob("inject-*/appliance.tag")
        members = process.tagged(tag_file.read_text().strip())
        assert qemu in members
        litter += _tmp_litter(qemu, members)
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                fds[pid] = os.pidfd_open(pid)
        child.kill()  # the run dies; its appliance does not
        child.wait(timeout=30)
        assert not _exited(fds[qemu])

        report = reaper.reap(cfg)

        assert [ln.split(" (PIDs ")[0] for ln in report.removed] == [
            "job run-reapertest: injection appliance killed"
        ]
        assert report.removed[0].endswith("(its `vmbatch run` process is gone)")
        assert all(_exited(fd) for fd in fds.values()), "the appliance is still running"
        assert report.undecided[0].startswith("libvirt: ")
        assert report.undecided[1:] == [
            "job run-reapertest: left alone: libvirt did not answer (its `vmbatch run`"
            " process is gone)"
        ]
        assert jobdir.path.exists()  # its VM may still use it: only with libvirt back
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for fd in fds.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        teardown(cfg, None, "", jobdir)
        for junk in litter:
            if junk.is_dir():
                shutil.rmtree(junk, ignore_errors=True)
            else:
                junk.unlink(missing_ok=True)


def _exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


def test_tagged_processes_whose_job_directory_is_gone_are_killed_and_others_kept(
    tmp_path: Path,
) -> None:
    """An appliance whose job directory went (the tag file with it) is found by its tag in
    /proc; a tagged process whose tag file is still there, and one of another
    configuration (another libguestfs cache directory), are left alone."""
    from vmbatch import config, process, reaper

    cfg = config.load(_no_libvirt_config(tmp_path, tmp_path / "x.raw"))
    cache = str(cfg.paths.cache_dir / "libguestfs")
    live_dir = cfg.paths.job_dir / "77" / "inject-abc"
    live_dir.mkdir(parents=True)
    tags = {n: process.new_tag() for n in ("orphan", "live", "foreign")}
    (live_dir / "appliance.tag").write_text(tags["live"] + "\n")

    def tagged(name: str, cachedir: str, disk: Path) -> subprocess.Popen[bytes]:
        # Like guestfish: the tag in the environment, the job's disk on the command line.
        return subprocess.Popen(
            ["/bin/sh", "-c", "sleep 600; true", str(disk)],  # (no exec: two processes)
            env={process.TAG_VAR: tags[name], "LIBGUESTFS_CACHEDIR": cachedir, "PATH": "/bin"},
        )

    gone_disk = cfg.paths.job_dir / "76" / "overlay.qcow2"  # its directory was removed
    procs = {
        "orphan": tagged("orphan", cache, gone_disk),
        "live": tagged("live", cache, cfg.paths.job_dir / "77" / "overlay.qcow2"),
        "foreign": tagged("foreign", str(tmp_path / "other-cache"), gone_disk),
    }
    try:
        deadline = time.monotonic() + 30  # until each shell has started its sleep
        while any(len(process.tagged(t)) < 2 for t in tags.values()):
            assert time.monotonic() < deadline, "the tagged processes did not start"
            time.sleep(0.05)  # polling with a deadline
        orphans = process.tagged(tags["orphan"])
        report = reaper.reap(cfg, dry_run=True)
        assert report.removed == [
            f"injection appliance {tags['orphan'][:8]}: would kill PIDs"
            f" {' '.join(map(str, orphans))} (its job directory is gone)"
        ]
        report = reaper.reap(cfg)
        assert report.removed == [
            f"injection appliance {tags['orphan'][:8]}: PIDs {' '.join(map(str, orphans))}"
            " killed (its job directory is gone)"
        ]
        assert procs["orphan"].wait(timeout=30) == -signal.SIGKILL
        assert process.tagged(tags["orphan"]) == []
        assert procs["live"].poll() is None and procs["foreign"].poll() is None
    finally:
        for tag in tags.values():
            process.kill_tagged(tag, timeout=10)
        for proc in procs.values():
            proc.wait(timeout=30)
