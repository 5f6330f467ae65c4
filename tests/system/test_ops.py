"""The operator's commands against real running job VMs (tiny guest, real libvirtd/QEMU):
``vmbatch ps``, ``logs``, ``ssh``, ``console``, and keeping a failed job's VM.

Jobs are made as pbs_mom makes them (tests/system/test_torque.py's ``Mom``: the prologue
and epilogue with Torque's arguments), so job ids have Torque's long form. Commands run as
root, as the job's user (the throw-away host user of ``batch_site``) and as another user
(``nobody``). The reaper's clock is given (``reap(now=...)``) instead of waiting for it.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.system.conftest import FINISHED, VMBATCH, BatchSite, SlurmSite
from tests.system.test_torque import Mom
from vmbatch import config, reaper
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import domain_name

SCRIPT = "#!/bin/sh\necho hi\n"


def as_user(
    bs: BatchSite, *args: str, uid: int | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``vmbatch -c CONFIG ARGS`` as the job's user (or ``uid``), stdin not a terminal."""
    u = bs.user
    who = {"user": u.uid, "group": u.gid} if uid is None else {"user": uid, "group": uid}
    return subprocess.run(
        [str(VMBATCH), "-c", str(bs.site.config), *args],
        env={"PATH": "/usr/bin:/bin", "HOME": str(u.home), "LC_ALL": "C.UTF-8"},
        cwd="/",
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        check=False,
        extra_groups=[],
        **who,  # type: ignore[arg-type]
    )


@pytest.fixture
def job(batch_site: BatchSite) -> Iterator[Mom]:
    """A Torque job whose VM runs (prologue done); its epilogue runs afterwards anyway."""
    mom = Mom(batch_site, SCRIPT)
    pro = mom.prologue()
    assert pro.returncode == 0, pro.stderr.decode()
    try:
        yield mom
    finally:
        mom.epilogue(0)
        batch_site.site.vmbatch("cleanup", mom.job_id)


def nobody() -> int:
    import pwd

    return pwd.getpwnam("nobody").pw_uid


def test_ps_ssh_and_logs_of_a_running_job(
    job: Mom, batch_site: BatchSite, libvirt_conn: Connection
) -> None:
    bs = batch_site
    # ps, as root: the job, its user, state, phase, SSH port.
    res = bs.site.vmbatch("ps")
    assert res.returncode == 0, res.stderr.decode()
    print(res.stdout.decode())
    lines = res.stdout.decode().splitlines()
    mine = [line for line in lines if line.startswith(job.job_id + " ")]
    assert len(mine) == 1, lines
    cells = mine[0].split()
    assert cells[1:5] == [bs.user.name, "demo", "running", "ready"]
    assert cells[-1] == "tcg"
    res = bs.site.vmbatch("ps", "--json")
    assert res.returncode == 0
    (row,) = [r for r in json.loads(res.stdout) if r["job_id"] == job.job_id]
    print(json.dumps(row, indent=2))
    assert row["user"] == bs.user.name and row["scheduler"] == "torque"
    assert row["domain"] == domain_name(job.job_id) and row["state"] == "running"
    assert row["phase"] == "ready" and row["vcpus"] == 1
    assert isinstance(row["ssh_port"], int)

    # ssh, as the job's user: the command runs as them in the VM, its status comes back.
    res = as_user(bs, "ssh", job.job_id, "--", "sh", "-c", "id -un; echo oops >&2; exit 3")
    print(res.stdout.decode(), res.stderr.decode())
    assert res.returncode == 3, res.stderr.decode()
    assert res.stdout.decode() == f"{bs.user.name}\n"
    assert res.stderr.decode() == "oops\n"
    # ... the port it used is the one ps shows.
    guest = json.loads((bs.user_dir / job.job_id / "guest.json").read_text())
    assert guest["port"] == row["ssh_port"]

    # ssh, as root: as the job's user, from root's own copy of the login.
    res = bs.site.vmbatch("ssh", job.job_id, "--", "id", "-u")
    assert (res.returncode, res.stdout.decode()) == (0, f"{bs.user.uid}\n"), res.stderr
    res = bs.site.vmbatch("ssh", "--root", job.job_id, "--", "true")
    assert res.returncode == 65
    assert b"has no login for root" in res.stderr

    # ssh, as another user: refused, naming the owner.
    res = as_user(bs, "ssh", job.job_id, "--", "true", uid=nobody())
    print(res.stderr.decode())
    assert res.returncode == 65
    assert (
        f"job {job.job_id} belongs to {bs.user.name}: only {bs.user.name} (and root) may"
        " log in to its VM"
    ) in res.stderr.decode()

    # ps, as a user: libvirt here refuses non-root callers (no polkit): said at once.
    res = as_user(bs, "ps", uid=nobody())
    print(res.stderr.decode())
    assert res.returncode == 65
    assert b"user nobody may not use libvirt at qemu:///system" in res.stderr
    assert b"run the command as root" in res.stderr
    assert b"is libvirtd running" not in res.stderr
    assert b"retry" not in res.stderr.lower()

    # logs: the console (the tiny guest announces SSH there) and vmbatch's lines.
    res = bs.site.vmbatch("logs", job.job_id, "--lines", "200")
    assert res.returncode == 0, res.stderr.decode()
    out = res.stdout.decode()
    print(out[-2000:])
    assert "[console] vmbatch-tiny: ssh ready" in out
    assert all(line.startswith(("[console] ", "[vmbatch] ")) for line in out.splitlines())
    res = as_user(bs, "logs", job.job_id)
    assert res.returncode == 65 and b"are root's" in res.stderr


def _read_until(fd: int, marker: bytes, timeout: float = 60) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{marker!r} not seen; got {seen[-2000:]!r}"
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            assert data, f"the console ended before {marker!r}; got {seen[-2000:]!r}"
            seen += data
    return seen


def test_ssh_shell_on_a_terminal_and_from_a_pipe_then_logs_follow_to_the_end(
    job: Mom, batch_site: BatchSite
) -> None:
    bs = batch_site
    # A shell on a terminal (pty here): what is typed runs, the shell's status comes back.
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [str(VMBATCH), "-c", str(bs.site.config), "ssh", job.job_id],
        stdin=slave, stdout=slave, stderr=slave, user=bs.user.uid, group=bs.user.gid,
        extra_groups=[], env={"PATH": "/usr/bin:/bin", "TERM": "vt100"}, cwd="/",
    )  # fmt: skip
    os.close(slave)
    try:
        os.write(master, b"tty; echo $((6 * 7)); exit 5\r")
        seen = _read_until(master, b"42")
        print(seen.decode(errors="replace"))
        assert b"/dev/pts/" in seen  # the guest side has a terminal too
        assert proc.wait(timeout=60) == 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        os.close(master)
    # A shell fed from a pipe: no terminal, commands from stdin.
    res = subprocess.run(
        [str(VMBATCH), "-c", str(bs.site.config), "ssh", job.job_id],
        input=b"id -un\nexit 4\n", capture_output=True, timeout=120, user=bs.user.uid,
        group=bs.user.gid, extra_groups=[], env={"PATH": "/usr/bin:/bin"}, cwd="/",
    )  # fmt: skip
    assert (res.returncode, res.stdout) == (4, f"{bs.user.name}\n".encode()), res.stderr
    # logs --follow ends by itself once the epilogue removed the job's VM.
    follow = subprocess.Popen(
        [str(VMBATCH), "-c", str(bs.site.config), "logs", "--follow", job.job_id],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert follow.stdout is not None
        first = follow.stdout.readline()
        assert first.startswith(b"[console] ")
        assert job.epilogue(0).returncode == 0
        out, err = follow.communicate(timeout=60)
        assert follow.returncode == 0, err
        assert out.decode().splitlines()[-1] == (
            f"[vmbatch] job {job.job_id}: its VM is gone (job directory removed)"
        )
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait(timeout=30)


def test_console_shows_what_the_guest_writes_and_ends_with_the_escape_key(
    job: Mom, batch_site: BatchSite
) -> None:
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [str(VMBATCH), "-c", str(batch_site.site.config), "console", job.job_id],
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    try:
        seen = _read_until(master, b"Escape character is ^]")
        # A login makes the guest's dropbear (logging to the console) write a line.
        res = as_user(batch_site, "ssh", job.job_id, "--", "true")
        assert res.returncode == 0, res.stderr.decode()
        seen += _read_until(master, batch_site.user.name.encode())
        print(seen.decode(errors="replace"))
        os.write(master, b"\x1d")
        assert proc.wait(timeout=30) == 0
        # virtlogd logged the same lines meanwhile (the console and the log work together).
        res = batch_site.site.vmbatch("logs", job.job_id, "--lines", "500")
        assert f"Pubkey auth succeeded for '{batch_site.user.name}'".encode() in res.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        os.close(master)


def test_a_failed_job_is_kept_paused_then_reaped_after_its_time(
    batch_site: BatchSite, libvirt_conn: Connection
) -> None:
    bs = batch_site
    text = bs.site.config.read_text().replace("[batch]\n", '[batch]\nkeep_failed = "paused"\n'
                                              "keep_failed_for = 600\n", 1)  # fmt: skip
    bs.site.config.write_text(text)
    mom = Mom(bs, SCRIPT)
    name = domain_name(mom.job_id)
    try:
        assert mom.prologue().returncode == 0
        before = time.time()
        epi = mom.epilogue(1)
        assert epi.returncode == 0, epi.stderr.decode()
        print(epi.stderr.decode())
        assert b"is kept paused for inspection until" in epi.stderr
        # Kept: paused, not destroyed; recorded; accounted.
        status = libvirt_conn.status(name)
        assert status is not None and status.state == "paused"
        (line,) = bs.records()
        assert line["job_id"] == mom.job_id and line["exit_status"] == 1
        rec = json.loads((bs.state_dir / f"{mom.job_id}.json").read_text())
        assert rec["phase"] == "kept" and rec["kept_as"] == "paused"
        assert before + 600 <= rec["kept_until"] <= time.time() + 600
        res = bs.site.vmbatch("ps")
        print(res.stdout.decode())
        (mine,) = [x for x in res.stdout.decode().splitlines() if x.startswith(mom.job_id)]
        assert " paused " in mine and "kept:paused (" in mine
        res = bs.site.vmbatch("ssh", mom.job_id, "--", "true")
        assert res.returncode == 65 and b"is paused (kept for inspection)" in res.stderr

        cfg = config.load(bs.site.config)
        # The scheduler has forgotten the job (no pbs_mom job file): kept all the same.
        report = reaper.reap(cfg, now=rec["kept_until"] - 1)
        assert not any(mom.job_id in x for x in report.removed), report
        assert libvirt_conn.status(name) is not None
        # After its time: the reaper removes it, VM and files.
        report = reaper.reap(cfg, now=rec["kept_until"] + 1)
        print(report)
        assert any(mom.job_id in x and "time is up" in x for x in report.removed), report
        assert libvirt_conn.status(name) is None
        assert not (bs.site.job_dir / mom.job_id).exists()
        assert not (bs.state_dir / f"{mom.job_id}.json").exists()
        assert len(bs.records()) == 1  # no second accounting line
    finally:
        bs.site.vmbatch("cleanup", mom.job_id)


def test_a_failed_job_kept_as_disks_shows_in_ps_and_cleanup_removes_it(
    batch_site: BatchSite, libvirt_conn: Connection
) -> None:
    bs = batch_site
    text = bs.site.config.read_text().replace("[batch]\n", '[batch]\nkeep_failed = "disks"\n', 1)
    bs.site.config.write_text(text)
    mom = Mom(bs, SCRIPT)
    try:
        assert mom.prologue().returncode == 0
        assert mom.epilogue(2).returncode == 0
        assert libvirt_conn.status(domain_name(mom.job_id)) is None
        overlay = bs.site.job_dir / mom.job_id / "overlay.qcow2"
        assert overlay.is_file()
        res = bs.site.vmbatch("ps", "--json")
        (row,) = [r for r in json.loads(res.stdout) if r["job_id"] == mom.job_id]
        assert (row["state"], row["phase"], row["kept_as"]) == (None, "kept", "disks")
        res = bs.site.vmbatch("logs", mom.job_id)
        assert b"[console] vmbatch-tiny: ssh ready" in res.stdout
        res = bs.site.vmbatch("cleanup", mom.job_id)
        assert res.returncode == 0, res.stderr.decode()
        assert not overlay.parent.exists()
        assert not (bs.state_dir / f"{mom.job_id}.json").exists()
    finally:
        bs.site.vmbatch("cleanup", mom.job_id)


def test_keep_failed_max_bounds_what_is_kept(
    batch_site: BatchSite, libvirt_conn: Connection
) -> None:
    bs = batch_site
    text = bs.site.config.read_text().replace("[batch]\n", '[batch]\nkeep_failed = "disks"\n'
                                              "keep_failed_max = 0\n", 1)  # fmt: skip
    bs.site.config.write_text(text)
    mom = Mom(bs, SCRIPT)
    try:
        assert mom.prologue().returncode == 0
        epi = mom.epilogue(1)
        assert b"is not kept: 0 job(s) kept on this node already" in epi.stderr
        assert not (bs.site.job_dir / mom.job_id).exists()
        assert libvirt_conn.status(domain_name(mom.job_id)) is None
    finally:
        bs.site.vmbatch("cleanup", mom.job_id)


def test_a_vm_whose_prologue_failed_after_it_was_made_is_kept(
    batch_site: BatchSite, libvirt_conn: Connection
) -> None:
    """The guest's SSH is forwarded to a port nothing listens on ([ssh].port = 2222; the
    tiny guest's dropbear listens on 22): the boot times out after the VM was made."""
    bs = batch_site
    text = bs.site.config.read_text().replace("[batch]\n", '[batch]\nkeep_failed = "paused"\n', 1)
    text = text.replace("boot_timeout = 300", "boot_timeout = 5")
    bs.site.config.write_text(text + "\n[ssh]\nport = 2222\n")
    mom = Mom(bs, SCRIPT)
    name = domain_name(mom.job_id)
    try:
        pro = mom.prologue()
        print(pro.stderr.decode())
        assert pro.returncode == 0  # the image's fault: the job starter fails the job
        assert b"is kept paused for inspection until" in pro.stderr
        status = libvirt_conn.status(name)
        assert status is not None and status.state == "paused"
        rec = json.loads((bs.state_dir / f"{mom.job_id}.json").read_text())
        assert rec["phase"] == "kept" and "GuestBootTimeoutError" in rec["cause"]
        assert (bs.user_dir / mom.job_id / "error").is_file()  # the job's stderr learns why
        # The epilogue accounts for the job and leaves the VM kept.
        epi = mom.epilogue(65)
        assert epi.returncode == 0, epi.stderr.decode()
        (line,) = bs.records()
        assert line["job_id"] == mom.job_id and "GuestBootTimeoutError" in line["cause"]
        assert libvirt_conn.status(name) is not None
        # `vmbatch cleanup JOB` removes it at once.
        res = bs.site.vmbatch("cleanup", mom.job_id)
        assert res.returncode == 0, res.stderr.decode()
        assert libvirt_conn.status(name) is None
        assert not (bs.site.job_dir / mom.job_id).exists()
        assert len(bs.records()) == 1
    finally:
        bs.site.vmbatch("cleanup", mom.job_id)


def test_a_slurm_job_that_asks_to_be_kept_is_kept_when_it_fails(
    slurm: SlurmSite, libvirt_conn: Connection
) -> None:
    """Through a real Slurm: the exit status reaches the Epilog (SLURM_JOB_EXIT_CODE2) and
    the job's own '#VMBATCH keep=yes' (allowed by user_keep) keeps its VM paused."""
    bs = slurm.bs
    text = bs.site.config.read_text().replace("[batch]\n", "[batch]\nuser_keep = true\n", 1)
    bs.site.config.write_text(text)
    job_id = slurm.submit("#!/bin/sh\n#VMBATCH keep=yes\necho failing\nexit 3\n")
    record = bs.state_dir / f"{job_id}.json"
    try:
        job = slurm.cluster.wait_job(job_id, FINISHED, 120)
        assert (job["JobState"], job["ExitCode"]) == ("FAILED", "3:0"), slurm.output(job_id)
        deadline = time.monotonic() + 60
        while "COMPLETING" in slurm.cluster.node()["State"]:
            assert time.monotonic() < deadline, slurm.cluster.node()
            time.sleep(0.2)  # polling with a deadline
        rec = json.loads(record.read_text())
        assert (rec["phase"], rec["kept_as"], rec["keep"]) == ("kept", "paused", "yes")
        status = libvirt_conn.status(domain_name(job_id))
        assert status is not None and status.state == "paused"
        (line,) = bs.records()
        assert (line["job_id"], line["exit_status"]) == (job_id, 3)
        res = bs.site.vmbatch("cleanup", job_id)
        assert res.returncode == 0, res.stderr.decode()
        assert libvirt_conn.status(domain_name(job_id)) is None
    finally:
        bs.site.vmbatch("cleanup", job_id)
