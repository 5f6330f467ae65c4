"""Torque contract tests: the hooks called exactly as pbs_mom calls them, with real VMs.

Torque is not packaged for Debian 12, so pbs_mom is stood in for by these calls. Each fact
comes from Torque's documentation (Torque 6 Administrator Guide, Appendix G "Prologue and
Epilogue Scripts": the argument tables, "Prologue and epilogue scripts run as root ...
with the minimal environment", the exit-code table "0 ... job runs; 1 ... job aborted;
other ... job requeued"; "Node manager (MOM) configuration": ``$job_starter`` and
``$job_starter_run_privileged``) and was observed with a real pbs_mom 6.1.3
(docs/platform.md, "Torque"):

- prologue: root, argv = job id, user, group, job name, resource list, queue, account,
  script copy; minimal environment (PATH=/bin:/usr/bin, PBS_O_WORKDIR, ...), umask 0077,
  stdin /dev/null, cwd mom_priv.
- job starter: as the user (or root with run_privileged), argv = starter + the user's
  shell, stdin one line "script path + qsub -F arguments", the job's environment
  (PBS_JOBID, ...), cwd the user's home; its exit status is the job's.
- epilogue: root, 11 arguments (..., exit status, script); exit ignored.
- epilogue.precancel: on qdel, as the user, stdio /dev/null; must not fail.

The one deviation: ``VMBATCH_CONFIG`` points the hooks at this test's configuration
(production uses /etc/vmbatch/vmbatch.toml). The privileged starter ignores it (its
environment is the job's), so there the test uses what a site with a non-default path does:
a root-owned shim ``exec vmbatch-starter --config PATH "$@"`` as ``$job_starter``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.system.conftest import ROOT, BatchSite
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import domain_name

BIN = ROOT / ".venv" / "bin"
MARKER = "cryptomgr.notests"  # on the tiny guest's kernel command line, not the host's


def _job_id() -> str:
    return f"{uuid.uuid4().int % 10**6}.torque-test"


class Mom:
    """Calls the hooks the way pbs_mom does, for one job."""

    def __init__(self, bs: BatchSite, script: str, resources: str = "nodes=1:ppn=1") -> None:
        self.bs = bs
        self.job_id = _job_id()
        self.mom_priv = bs.site.root / "mom_priv"
        (self.mom_priv / "jobs").mkdir(parents=True, exist_ok=True)
        self.script = self.mom_priv / "jobs" / f"{self.job_id}.SC"
        self.script.write_text(script)
        os.chown(self.script, bs.user.uid, bs.user.gid)
        self.resources = resources

    def _root_env(self) -> dict[str, str]:
        return {"PATH": "/bin:/usr/bin", "PBS_O_WORKDIR": str(self.bs.user.home), **self.bs.env}

    def prologue_argv(self) -> list[str]:
        u = self.bs.user
        return [str(BIN / "vmbatch-prologue"), self.job_id, u.name, u.name, "job.sh",
                self.resources, "batch", "", str(self.script)]  # fmt: skip

    def prologue(self) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.prologue_argv(), env=self._root_env(), cwd=self.mom_priv,
            stdin=subprocess.DEVNULL, capture_output=True, timeout=400, umask=0o077,
            check=False,
        )  # fmt: skip

    def shim(self) -> Path:
        """The site's ``$job_starter`` shim naming its configuration (root-owned, 0755)."""
        shim = self.bs.site.root / "job_starter"
        shim.write_text(
            f'#!/bin/sh\nexec {BIN}/vmbatch-starter --config {self.bs.site.config} "$@"\n'
        )
        shim.chmod(0o755)
        return shim

    def starter(
        self,
        args: str = "",
        privileged: bool = False,
        env_extra: dict[str, str] | None = None,
        shim: bool = True,
        **kw: object,
    ) -> subprocess.Popen[bytes]:
        u = self.bs.user
        env = {
            "PBS_JOBID": self.job_id,
            "PBS_O_WORKDIR": str(u.home),
            "HOME": str(u.home),
            "USER": u.name,
            "PBS_WALLTIME": "600",
            "PATH": "/bin:/usr/bin",
            "FROM_QSUB_V": "it's here",
            **self.bs.env,
            **(env_extra or {}),
        }
        starter = self.shim() if privileged and shim else BIN / "vmbatch-starter"
        proc = subprocess.Popen(
            [str(starter), "/bin/sh"],
            env=env,
            cwd=u.home,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **({} if privileged else {"user": u.uid, "group": u.gid, "extra_groups": []}),
            **kw,  # type: ignore[arg-type]
        )
        assert proc.stdin is not None
        proc.stdin.write(f"{self.script} {args}\n".encode())
        proc.stdin.close()
        proc.stdin = None  # pbs_mom's pipe: one line, then end of file
        return proc

    def epilogue(self, status: int, session: str = "4242") -> subprocess.CompletedProcess[bytes]:
        """pbs_mom's epilogue call; ``session`` 0: pbs_mom never started the job."""
        u = self.bs.user
        argv = [
            str(BIN / "vmbatch-epilogue"),
            self.job_id,
            u.name,
            u.name,
            "job.sh",
            session,
            self.resources,
            "cput=00:00:01",
            "batch",
            "",
            str(status),
            str(self.script),
        ]
        return subprocess.run(
            argv,
            env=self._root_env(),
            cwd=self.mom_priv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=120,
            umask=0o077,
            check=False,
        )


def _finish(proc: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out.decode(), err.decode()


def test_job_runs_in_its_vm_as_the_user_with_its_status(
    batch_site: BatchSite, libvirt_conn: Connection
) -> None:
    mom = Mom(
        batch_site, '#!/bin/sh\ncat /proc/cmdline\nid -u\necho "args:$*|$FROM_QSUB_V"\nexit 7\n'
    )
    pro = mom.prologue()
    assert pro.returncode == 0, pro.stderr.decode()
    assert libvirt_conn.is_running(domain_name(mom.job_id))
    userdir = batch_site.user_dir / mom.job_id
    assert userdir.stat().st_uid == batch_site.user.uid
    assert oct(userdir.stat().st_mode & 0o777) == "0o700"
    assert oct(batch_site.state_dir.stat().st_mode & 0o777) == "0o700"
    status, out, err = _finish(mom.starter(args="a 'b c'"))
    assert status == 7, err
    assert MARKER in out and MARKER not in Path("/proc/cmdline").read_text()
    assert f"\n{batch_site.user.uid}\n" in out
    assert "args:a b c|it's here" in out
    epi = mom.epilogue(7)
    assert epi.returncode == 0, epi.stderr.decode()
    assert not libvirt_conn.is_running(domain_name(mom.job_id))
    (record,) = batch_site.records()
    assert record["job_id"] == mom.job_id and record["exit_status"] == 7
    assert record["image"] == "demo" and record["user"] == batch_site.user.name
    assert isinstance(record["boot_seconds"], float) and record["cause"] is None
    assert (record["exit_signal"], record["exit_source"]) == (0, "pbs_mom")
    assert record["script_ran"] is True and isinstance(record["run_seconds"], float)


class Planted:
    """What a hostile user prepares in their home for a privileged starter: a config whose
    state and user directories are theirs, a state record claiming gid 42 (Debian's shadow
    group) and an ``error`` file that is a symlink to a root:shadow 0640 secret."""

    def __init__(self, bs: BatchSite, job_id: str) -> None:
        u = bs.user
        self.secret_text = f"SECRET-{uuid.uuid4().hex}"
        self.secret = bs.site.root / "secret"
        self.secret.write_text(self.secret_text + "\n")
        os.chown(self.secret, 0, 42)
        self.secret.chmod(0o640)
        evil = u.home / f"evil-{job_id}"  # the home lives for the session: one per job
        (evil / "state").mkdir(parents=True)
        (evil / "run" / job_id).mkdir(parents=True)
        record = {"job_id": job_id, "scheduler": "torque", "user": u.name, "uid": u.uid,
                  "gid": 42, "phase": "ready"}  # fmt: skip
        (evil / "state" / f"{job_id}.json").write_text(json.dumps(record))
        (evil / "run" / job_id / "error").symlink_to(self.secret)
        self.config = evil / "evil.toml"
        self.config.write_text(f'[batch]\nstate_dir = "{evil}/state"\nuser_dir = "{evil}/run"\n')
        subprocess.run(["chown", "-R", f"{u.uid}:{u.gid}", str(evil)], check=True, timeout=30)


def test_privileged_starter_becomes_the_user(batch_site: BatchSite) -> None:
    """Through the site's shim; the job's own VMBATCH_CONFIG (qsub -v) changes nothing."""
    mom = Mom(batch_site, "id -u; id -g\n")
    planted = Planted(batch_site, mom.job_id)
    assert mom.prologue().returncode == 0
    hostile = {"VMBATCH_CONFIG": str(planted.config)}
    status, out, err = _finish(mom.starter(privileged=True, env_extra=hostile))
    u = batch_site.user
    assert (status, out.split()) == (0, [str(u.uid), str(u.gid)]), err
    assert planted.secret_text not in out + err
    assert mom.epilogue(0).returncode == 0


def test_privileged_starter_trusts_nothing_from_the_jobs_environment(
    batch_site: BatchSite,
) -> None:
    """The attack of issue 13 (tried on a real pbs_mom 6.1.3 with run_privileged): qsub -v
    VMBATCH_CONFIG=~/evil.toml and PBS_JOBID, a planted record and a symlinked error file
    made the starter print a root:shadow file into the job's .e file."""
    mom = Mom(batch_site, "id\n")
    planted = Planted(batch_site, mom.job_id)
    hostile = {"VMBATCH_CONFIG": str(planted.config), "PBS_JOBID": mom.job_id}
    status, out, err = _finish(mom.starter(privileged=True, env_extra=hostile, shim=False))
    assert planted.secret_text not in out + err
    assert status != 0 and "no VM was prepared for job" in err, err
    # Through the shim: another job's id in PBS_JOBID is refused, not followed.
    other = {"PBS_JOBID": "999.elsewhere"}
    status, out, err = _finish(mom.starter(privileged=True, env_extra=other))
    assert status != 0 and "is not the job being started" in err and out == ""
    # A record (root's own, here written by the test) whose gid is not the user's.
    batch_site.state_dir.mkdir(mode=0o700, exist_ok=True)
    forged = json.loads((planted.config.parent / "state" / f"{mom.job_id}.json").read_text())
    (batch_site.state_dir / f"{mom.job_id}.json").write_text(json.dumps(forged))
    status, out, err = _finish(mom.starter(privileged=True))
    assert status != 0 and "password database does not confirm" in err
    assert planted.secret_text not in out + err
    assert mom.epilogue(65).returncode == 0


@pytest.mark.parametrize(
    ("script", "resources", "says"),
    [
        ("#!/bin/sh\n#VMBATCH image=nosuch\ntrue\n", "nodes=1:ppn=1", "'nosuch' is not offered"),
        ("#!/bin/sh\n#VMBATCH colour=blue\ntrue\n", "nodes=1:ppn=1", "unknown #VMBATCH key"),
        ("true\n", "nodes=1:ppn=4096", "asks for 4096 cores"),
    ],
)
def test_job_problems_reach_the_jobs_stderr_and_fail_only_the_job(
    batch_site: BatchSite, script: str, resources: str, says: str
) -> None:
    """Exit 0 from the prologue: 1 would abort the job without delivering its .e file."""
    mom = Mom(batch_site, script, resources)
    pro = mom.prologue()
    assert pro.returncode == 0, pro.stderr.decode()
    status, out, err = _finish(mom.starter())
    assert status == 65 and says in err and out == ""
    assert err.startswith("vmbatch: error: ")
    assert mom.epilogue(65).returncode == 0
    (record,) = batch_site.records()
    assert says in str(record["cause"]) or "JobError" in str(record["cause"])


def _node_without_libvirt(bs: BatchSite, pbsnodes: str) -> None:
    """libvirtd unreachable (a node problem), and ``pbsnodes`` the given shell script body,
    standing in for Torque's client."""
    site = bs.site
    fake = site.root / "pbsnodes"
    fake.write_text(f"#!/bin/sh\n{pbsnodes}\n")
    fake.chmod(0o755)
    site.write(
        f'\n[tools]\npbsnodes = "{fake}"\n[libvirt]\nuri = '
        f'"qemu+unix:///system?socket={site.root}/no-libvirt-sock"\ntimeout = 5\n'
    )


def test_node_problem_requeues_takes_the_node_offline_and_vmbatch_brings_it_back(
    batch_site: BatchSite,
) -> None:
    site = batch_site.site
    calls, note, cleared = (site.root / n for n in ("pbsnodes.calls", "note", "cleared"))
    healthy = site.config.read_text()
    # Stands in for pbs_server's view: `-o -N NOTE` sets it, `NODE` lists it, `-c` clears.
    _node_without_libvirt(
        batch_site,
        f'case "$1" in\n-o) printf "%s\\n" "$@" > {calls}; printf "%s" "$3" > {note} ;;\n'
        f'-c) printf "%s\\n" "$@" > {cleared} ;;\n'
        f'*) echo "$1"; echo "     state = free,offline"; echo "     note = $(cat {note})" ;;\n'
        "esac",
    )
    mom = Mom(batch_site, "true\n")
    pro = mom.prologue()
    assert pro.returncode == 2, pro.stderr.decode()
    assert b"libvirt" in pro.stderr
    args = calls.read_text().splitlines()
    assert args[:2] == ["-o", "-N"] and "libvirt" in args[2]
    assert mom.epilogue(-2, session="0").returncode == 0
    (record,) = batch_site.records()  # JOB_EXEC_FAIL2, never started: no run time
    assert (record["exit_status"], record["script_ran"], record["run_seconds"]) == (-2, False, None)
    assert "LibvirtUnavailableError" in str(record["cause"]), record
    # The reaper leaves the node offline while libvirtd does not answer...
    reaper = site.vmbatch("cleanup", "--stale")
    assert "stays out of service" in reaper.stdout.decode() and not cleared.exists()
    # ... and brings it back, with vmbatch's own note cleared, once it does.
    tools = site.config.read_text().split("[libvirt]")[0].removeprefix(healthy)
    site.config.write_text(healthy + tools)
    reaper = site.vmbatch("cleanup", "--stale")
    assert "returned to service" in reaper.stdout.decode(), reaper
    assert cleared.read_text().splitlines() == ["-c", "-N", "", socket.gethostname()]


def test_no_loop_when_pbsnodes_cannot_take_the_node_offline(batch_site: BatchSite) -> None:
    """Issue 14: with `pbsnodes -o` failing (no operator rights, another node name), exit 2
    made pbs_mom redispatch the job to this same node at once, in a tight loop. Now the
    job runs once and its .e file says why; the prologue exits 0."""
    # Refusing, as pbs_server does without operator rights.
    _node_without_libvirt(batch_site, 'echo "pbsnodes: Unauthorized Request" >&2; exit 1')
    mom = Mom(batch_site, "echo never\n")
    pro = mom.prologue()
    assert pro.returncode == 0, pro.stderr.decode()
    status, out, err = _finish(mom.starter())
    assert status == 65 and out == "", err
    assert "cannot run VMs right now" in err and "libvirt" in err
    assert "could not take the node offline" in err
    assert mom.epilogue(65).returncode == 0


def test_epilogue_without_prologue_and_odd_job_ids(batch_site: BatchSite) -> None:
    mom = Mom(batch_site, "true\n")
    epi = mom.epilogue(0)
    assert epi.returncode == 0, epi.stderr.decode()
    (record,) = batch_site.records()
    assert "prologue did not run" in str(record["cause"])
    mom.job_id = "1;touch x$(id)"  # pbs_mom's script copy is named after the job id
    mom.script = mom.script.rename(mom.script.with_name(f"{mom.job_id}.SC"))
    pro = mom.prologue()
    assert pro.returncode == 0 and b"characters vmbatch does not accept" in pro.stderr
    status, _, err = _finish(mom.starter())
    assert status == 65 and "does not accept" in err


def test_second_prologue_for_a_job_is_refused_while_the_first_runs(
    batch_site: BatchSite,
) -> None:
    mom = Mom(batch_site, "echo once\n")
    first = subprocess.Popen(
        mom.prologue_argv(), env=mom._root_env(), cwd=mom.mom_priv, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, umask=0o077,
    )  # fmt: skip
    try:
        state = batch_site.state_dir / f"{mom.job_id}.json"
        for line in iter(first.stderr.readline, b""):  # type: ignore[union-attr]
            if b"image demo" in line:  # the first one holds the lock and is booting
                break
        assert state.exists()
        second = mom.prologue()
        assert b"another vmbatch prologue" in second.stderr
        assert first.wait(timeout=300) == 0
    finally:
        first.kill() if first.poll() is None else None
        first.wait()
    status, out, _ = _finish(mom.starter())
    assert (status, out) == (0, "once\n")
    assert mom.epilogue(0).returncode == 0


def test_precancel_ends_the_job_in_the_guest(batch_site: BatchSite) -> None:
    mom = Mom(
        batch_site, "trap 'echo got-term; exit 3' TERM\necho started\nwhile :; do sleep 1; done\n"
    )
    assert mom.prologue().returncode == 0
    proc = mom.starter()
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    u = batch_site.user
    pre = subprocess.run(
        [str(BIN / "vmbatch-epilogue"), "--precancel", mom.job_id, u.name, u.name, "j"],
        env={"PATH": "/bin:/usr/bin", **batch_site.env},
        user=u.uid,
        group=u.gid,
        extra_groups=[],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=120,
        check=False,
    )
    assert pre.returncode == 0, pre.stderr.decode()
    status, out, _ = _finish(proc)
    assert status == 3 and "got-term" in out
    assert mom.epilogue(3).returncode == 0
    line = json.loads(batch_site.accounting.read_text())
    assert (line["exit_status"], line["script_ran"], line["cause"]) == (3, True, None), line
    assert line["run_seconds"] > 0


def _mounted(point: Path) -> bool:
    return any(
        line.split(" ")[4] == str(point)
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )


def test_a_mount_in_the_users_directory_cannot_keep_the_vm_alive(
    batch_site: BatchSite, libvirt_conn: Connection
) -> None:
    """Issue 13: a FUSE mount (fusermount is setuid) in the job's directory made root's
    rmtree fail before the VM was destroyed: VM, overlay and record leaked. A bind mount
    by root stands in for the user's mount: rmdir of a mount point fails the same way."""
    mom = Mom(batch_site, "true\n")
    assert mom.prologue().returncode == 0
    point = batch_site.user_dir / mom.job_id / "mnt"
    point.mkdir()
    os.chown(point, batch_site.user.uid, batch_site.user.gid)
    subprocess.run(["mount", "--bind", str(batch_site.site.root), str(point)], check=True,
                   timeout=30)  # fmt: skip
    try:
        epi = mom.epilogue(0)
        assert epi.returncode == 0, epi.stderr.decode()
        assert not libvirt_conn.is_running(domain_name(mom.job_id))
        assert not _mounted(point) and not point.parent.exists()
        assert b"detached a mount" in epi.stderr
    finally:
        if _mounted(point):
            subprocess.run(["umount", "-l", str(point)], check=False, timeout=30)


def test_cleanup_finishes_a_job_whose_epilogue_never_ran(
    batch_site: BatchSite, libvirt_conn: Connection
) -> None:
    mom = Mom(batch_site, "true\n")
    assert mom.prologue().returncode == 0
    assert libvirt_conn.is_running(domain_name(mom.job_id))
    done = batch_site.site.vmbatch("cleanup", mom.job_id)
    assert done.returncode == 0, done.stderr.decode()
    assert not libvirt_conn.is_running(domain_name(mom.job_id))
    assert not batch_site.leftovers()


def _on_terminal(mom: Mom, argv: list[str], privileged: bool = False) -> tuple[int, bytes]:
    """The starter as pbs_mom runs it for ``qsub -I``: the user's terminal as stdin and
    output (here a pseudo-terminal this test reads), ``SHELL [-c COMMAND]`` as arguments."""
    u = mom.bs.user
    master, slave = os.openpty()
    env = {"PBS_JOBID": mom.job_id, "HOME": str(u.home), "PATH": "/bin:/usr/bin",
           "TERM": "xterm", **mom.bs.env}  # fmt: skip
    starter = mom.shim() if privileged else BIN / "vmbatch-starter"
    proc = subprocess.Popen(
        [str(starter), *argv], env=env, cwd=u.home, stdin=slave, stdout=slave, stderr=slave,
        start_new_session=True,
        **({} if privileged else {"user": u.uid, "group": u.gid, "extra_groups": []}),
    )  # fmt: skip
    os.close(slave)
    seen = b""
    try:
        while True:
            try:
                chunk = os.read(master, 4096)  # ends with EIO once the starter has exited
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        return proc.wait(timeout=300), seen
    finally:
        proc.kill()
        os.close(master)


def test_interactive_job_runs_its_shell_on_a_terminal_in_the_vm(batch_site: BatchSite) -> None:
    """``qsub -I -x COMMAND``: the shell runs the command on a terminal in the guest."""
    mom = Mom(batch_site, "")
    assert mom.prologue().returncode == 0
    status, seen = _on_terminal(mom, ["/bin/bash", "-c", "tty; cat /proc/cmdline; exit 6"])
    assert status == 6, seen
    assert b"your shell /bin/bash is not in the job's VM; starting /bin/sh" in seen  # busybox
    assert b"/dev/pts/" in seen and MARKER.encode() in seen, seen
    # A privileged starter has no trusted job id for an interactive job: refused.
    status, seen = _on_terminal(mom, ["/bin/sh"], privileged=True)
    assert status == 65 and b"interactive jobs (qsub -I) cannot be started" in seen, seen
    assert mom.epilogue(status).returncode == 0
