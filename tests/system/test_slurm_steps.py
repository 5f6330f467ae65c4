"""Issue 15: Slurm job steps (``srun``, ``salloc`` + ``srun``) run in the job's VM.

The cluster is set up as docs/admin-slurm.md says, with ``cli_filter.lua`` giving every
``srun`` step vmbatch's bundle; the user types plain ``srun``/``salloc`` commands.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

from tests.system.conftest import BatchSite, SlurmSite
from tests.system.slurmhooks import vmbatch_cluster

MARKER = "cryptomgr.notests"  # on the tiny guest's kernel command line, not the host's


def _ended(slurm: SlurmSite, count: int, timeout: float = 120) -> list[dict[str, object]]:
    """The accounting records once ``count`` jobs ended and their Epilogs left nothing."""
    deadline = time.monotonic() + timeout
    while len(slurm.bs.records()) < count or slurm.bs.leftovers():
        assert time.monotonic() < deadline, (slurm.bs.records(), slurm.bs.leftovers())
        time.sleep(0.2)  # polling with a deadline
    return slurm.bs.records()


def test_srun_runs_its_command_in_the_jobs_vm_with_the_exit_status(slurm: SlurmSite) -> None:
    r = slurm.srun("sh", "-c", "cat /proc/cmdline; id -u; echo to-stderr >&2; exit 3")
    out = r.stdout.decode()
    assert MARKER in out and MARKER not in Path("/proc/cmdline").read_text(), r
    assert f"\n{slurm.user.uid}\n" in out and b"to-stderr" in r.stderr, r
    assert r.returncode == 3, r
    (record,) = _ended(slurm, 1)
    assert record["exit_status"] == 3, record

    env = {**os.environ, **slurm.cluster.env()}
    doctor = slurm.bs.site.vmbatch("doctor", env=env).stdout.decode()
    assert "ok   slurm steps: CliFilterPlugins=lua, TaskProlog=/" in doctor, doctor

    missing = slurm.srun("no-such-command", "x")
    assert missing.returncode == 127, missing
    assert b"vmbatch: no-such-command: command not found in the job's VM" in missing.stderr


def test_srun_with_more_tasks_than_nodes_is_refused_with_a_reason(slurm: SlurmSite) -> None:
    r = slurm.srun("-n", "2", "hostname")
    assert r.returncode != 0 and b"one task per node in the job's VM" in r.stderr, r
    assert not slurm.bs.records()  # refused before any job or VM


def test_steps_of_one_salloc_share_the_jobs_vm(slurm: SlurmSite) -> None:
    """Two steps of one allocation, one after the other, both in the job's one VM: the
    first leaves a file in the guest that the second reads. The allocation has two tasks
    (SLURM_NTASKS=2): a plain srun in it runs one task in the VM, it is not refused."""
    r = subprocess.run(
        ["runuser", "-u", slurm.user.name, "--", "salloc", "-N1", "-n2", "sh", "-c",
         "srun sh -c 'echo step1 > /tmp/shared; cat /proc/cmdline';"
         " srun cat /tmp/shared; echo salloc-shell-on=$(hostname)"],
        cwd=slurm.user.home, env=slurm.cluster.env(), capture_output=True, timeout=300,
        check=False,
    )  # fmt: skip
    out = r.stdout.decode()
    assert r.returncode == 0, r
    assert MARKER in out and "step1\n" in out, r
    # salloc's own shell runs where salloc runs, as without vmbatch.
    assert "salloc-shell-on=" in out
    assert _ended(slurm, 1)[0]["exit_status"] == 0


def test_sbatch_input_reaches_the_jobs_stdin_byte_exact(slurm: SlurmSite) -> None:
    data = bytes(range(256)) * 4 + os.urandom(3 << 20) + b"no newline at the end"
    infile = slurm.user.home / "input.bin"
    infile.write_bytes(data)
    os.chown(infile, slurm.user.uid, slurm.user.gid)
    job_id = slurm.cluster.sbatch(
        "#!/bin/sh\ncat > /tmp/in; sha256sum /tmp/in; wc -c < /tmp/in\n",
        slurm.user.name, slurm.user.home, f"--input={infile}",
    )  # fmt: skip
    job = slurm.settled(job_id, timeout=300)
    out = slurm.output(job_id)
    assert job["ExitCode"] == "0:0", out
    assert f"{hashlib.sha256(data).hexdigest()}  /tmp/in\n{len(data)}\n" in out, out


def test_srun_stdin_is_streamed_to_the_command(slurm: SlurmSite) -> None:
    data = b"line one\n" + bytes(range(1, 256)) + b"\nlast"
    r = slurm.srun("sh", "-c", "cat; echo; echo end-of-input", input_=data)
    assert r.returncode == 0, r
    assert r.stdout == data + b"\nend-of-input\n", r


class _Terminal:
    """``srun --pty`` run as the user on a pseudo-terminal this test drives, as a person
    at a terminal would."""

    def __init__(
        self, slurm: SlurmSite, rows: int, cols: int, *args: str, command: str = "srun --pty"
    ) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes srun on the terminal
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                os.chdir(slurm.user.home)
                os.execve(  # noqa: S606 - no shell: the argv as given
                    "/usr/sbin/runuser",
                    ["runuser", "-u", slurm.user.name, "--", *command.split(), *args],
                    {**slurm.cluster.env(), "TERM": "xterm", "SHELL": "/bin/sh"},
                )
            finally:
                os._exit(127)
        self.seen = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, text: bytes) -> None:
        os.write(self.fd, text)

    def expect(self, wanted: bytes, timeout: float = 300) -> bytes:
        """Read until ``wanted`` appears after what an earlier expect consumed."""
        deadline = time.monotonic() + timeout
        while wanted not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {wanted!r} on the terminal; it shows {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    chunk = b""
                assert chunk, f"terminal closed before {wanted!r}: {self.seen[-2000:]!r}"
                self.seen += chunk
        before, _, self.seen = self.seen.partition(wanted)
        return before

    def status(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            assert time.monotonic() < deadline, "srun --pty did not end"
            with_data, _, _ = select.select([self.fd], [], [], 0.2)
            if with_data:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:
                    time.sleep(0.1)  # polling with a deadline: the terminal is closed

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_srun_pty_gives_a_terminal_in_the_vm(slurm: SlurmSite) -> None:
    """A shell on a terminal in the guest: ``tty``, a typed line, the window size and its
    change, Ctrl-C to the foreground command, and the exit status."""
    term = _Terminal(slurm, 40, 120, "sh", "-i")
    try:
        term.type(b"tty; cat /proc/cmdline; echo T=$?\n")
        shown = term.expect(b"T=0")
        assert b"/dev/pts/" in shown and MARKER.encode() in shown, shown
        term.type(b"echo size=$(stty size)\n")
        term.expect(b"size=40 120")
        term.resize(30, 100)
        term.type(b"echo size=$(stty size)\n")
        term.expect(b"size=30 100")
        # Patterns the terminal's echo of the typed line does not contain: wait for the
        # command's own output, not the echo (a Ctrl-C typed before the line runs is read
        # by the shell's line editor instead).
        # (A foreground command killed by Ctrl-C also ends the shell's command list: this
        # one catches SIGINT and exits 3 instead.)
        term.type(b'sh -c \'trap "exit 3" INT; echo sta""rted; sleep 60 & wait\'; echo after=$?\n')
        term.expect(b"started")
        term.type(b"\x03")  # Ctrl-C: SIGINT to the foreground command in the guest
        term.expect(b"after=3")
        term.type(b"exit 5\n")
        assert term.status() == 5
    finally:
        term.kill()
    assert _ended(slurm, 1)[0]["exit_status"] == 5


def test_srun_inside_a_batch_script_runs_in_the_same_vm(slurm: SlurmSite) -> None:
    """docs/user-guide.md "Job steps": vmbatch's srun in the VM runs the step there."""
    job_id = slurm.submit(
        "#!/bin/sh\n"
        "echo here > /tmp/mark\n"
        "srun -n 2 --mem=100M sh -c 'echo task-$SLURM_PROCID-$(cat /tmp/mark)' | sort\n"
        "srun -N 2 hostname; echo refused=$?\n"
        "srun sh -c 'exit 4'; echo step=$?\n"
    )
    job = slurm.settled(job_id)
    out = slurm.output(job_id)
    assert job["ExitCode"] == "0:0", out
    assert "task-0-here\ntask-1-here\n" in out, out
    assert "vmbatch: srun: a step inside a job's VM runs on its node only" in out
    assert "refused=2\n" in out and "step=4\n" in out, out


def test_a_step_without_the_container_is_refused_not_run_on_the_node(slurm: SlurmSite) -> None:
    """srun from a client whose slurm.conf lacks cli_filter (a login node set up without
    it): the step names no container; vmbatch's TaskProlog fails it with the reason."""
    bare = slurm.cluster.dir / "etc-bare"
    bare.mkdir(mode=0o755)
    conf = slurm.cluster.conf.read_text()
    (bare / "slurm.conf").write_text(
        "\n".join(ln for ln in conf.splitlines() if not ln.startswith("CliFilterPlugins"))
    )
    r = subprocess.run(
        ["runuser", "-u", slurm.user.name, "--", "srun", "sh", "-c", "cat /proc/cmdline"],
        cwd=slurm.user.home, env={**slurm.cluster.env(), "SLURM_CONF": str(bare / "slurm.conf")},
        capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    assert r.returncode != 0, r
    assert b"would run on the node, outside the job's VM" in r.stdout, r
    assert MARKER.encode() not in r.stdout


def test_salloc_with_an_interactive_step_gives_a_shell_in_the_vm(batch_site: BatchSite) -> None:
    """``LaunchParameters=use_interactive_step``: salloc's shell is an interactive step on
    the node (srun --pty $SHELL), and so a terminal in the job's VM."""
    root, config = batch_site.site.root, batch_site.site.config
    extra = ["LaunchParameters=use_interactive_step"]
    with vmbatch_cluster(root, config, extra_conf=extra) as cluster:
        slurm = SlurmSite(batch_site, cluster)
        term = _Terminal(slurm, 24, 80, command="salloc")
        try:
            term.type(b"tty; cat /proc/cmdline; echo T=$?\n")
            shown = term.expect(b"T=0")
            assert b"/dev/pts/" in shown and MARKER.encode() in shown, shown
            term.type(b"exit 0\n")
            assert term.status() == 0
        finally:
            term.kill()
        assert _ended(slurm, 1)


def test_srun_pty_command_ended_by_ctrl_c_reports_130(slurm: SlurmSite) -> None:
    """The step's own process dies of SIGINT: sshd says "exit-signal", which paramiko
    does not pass on; the session's wrapper still reports 128+2 (review of issue 15)."""
    term = _Terminal(slurm, 24, 80, "sh", "-c", "echo started; exec sleep 60")
    try:
        term.expect(b"started")
        term.type(b"\x03")
        assert term.status() == 130
    finally:
        term.kill()
    assert _ended(slurm, 1)[0]["exit_status"] == 130
