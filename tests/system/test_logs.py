"""A whole batch job's log lines through a syslog or journal socket the test itself opens.

The hooks run as pbs_mom runs them (tests/system/test_torque.py, ``Mom``) with a real VM;
``[log]`` points the target at the test's own ``AF_UNIX``/``SOCK_DGRAM`` socket, drained
by a thread. The journal's entries are decoded here independently of vmbatch, after
systemd's documentation (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/).
"""

from __future__ import annotations

import io
import re
import select
import socket
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pycdlib
import pytest
import yaml

from tests.system.conftest import BatchSite, SlurmSite
from tests.system.test_torque import Mom, _finish
from tests.unit.test_logsetup import journal_entry
from vmbatch.state import JobDir

pytestmark = pytest.mark.system

RFC3164 = re.compile(rb"<(\d+)>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d ([\w.-]+)\[(\d+)\]: (.*)", re.S)
STAGE = re.compile(r"stage ([\w ]+) took (\d+\.\d{3})s")


class Collector:
    """A datagram socket at ``path`` (writable by the job's user: the starter logs too)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        path.chmod(0o666)
        self.datagrams: list[bytes] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while not self.done.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if ready:
                self.datagrams.append(self.sock.recv(1 << 20))

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=10)
        self.sock.setblocking(False)
        try:
            while True:
                self.datagrams.append(self.sock.recv(1 << 20))
        except BlockingIOError:
            pass
        self.sock.close()


@contextmanager
def collecting(path: Path) -> Iterator[Collector]:
    col = Collector(path)
    try:
        yield col
    finally:
        col.close()


def host_private_key(seed: Path) -> str:
    """The guest's private host key, from the job's NoCloud seed (its user-data)."""
    iso = pycdlib.PyCdlib()
    iso.open(str(seed))
    try:
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, joliet_path="/user-data")
    finally:
        iso.close()
    key = yaml.safe_load(out.getvalue())["ssh_keys"]["ed25519_private"]
    assert isinstance(key, str) and "PRIVATE KEY" in key
    return key


def key_lines(key: str) -> list[str]:
    """The key's base64 lines: none may show up anywhere, whole or alone."""
    return [ln for ln in key.splitlines() if ln and not ln.startswith("-----")]


def _use_target(bs: BatchSite, text: str) -> None:
    dropin = bs.site.root / "vmbatch.d"
    dropin.mkdir(exist_ok=True)
    (dropin / "50-log.toml").write_text(text)


@pytest.mark.parametrize("target", ["syslog", "journald"])
def test_a_jobs_lines_name_it_time_each_stage_and_hold_no_secret(
    batch_site: BatchSite, target: str
) -> None:
    sock = batch_site.site.root / f"{target}.sock"
    key = "syslog_socket" if target == "syslog" else "journal_socket"
    # debug: every line vmbatch has (external commands too) is searched for the keys.
    _use_target(batch_site, f'[log]\ntarget = "{target}"\nlevel = "debug"\n{key} = "{sock}"\n')
    mom = Mom(batch_site, "#!/bin/sh\necho hello\nexit 3\n")
    jobdir = JobDir(batch_site.site.job_dir, mom.job_id)
    with collecting(sock) as col:
        pro = mom.prologue()
        assert pro.returncode == 0, pro.stderr.decode()
        job_key = (batch_site.user_dir / mom.job_id / "id_ed25519").read_text()
        host_key = host_private_key(jobdir.seed)
        st = jobdir.log.lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
        joblog = jobdir.log.read_text()
        status, out, err = _finish(mom.starter())
        assert status == 3 and out == "hello\n", err
        epi = mom.epilogue(3)
        assert epi.returncode == 0, epi.stderr.decode()
    # The hooks' stderr (Torque: the job's .e file) and the job's: nothing of vmbatch's.
    assert (pro.stderr, err, epi.stderr) == (b"", "", b""), (pro.stderr, err, epi.stderr)

    lines: list[tuple[str, str, dict[str, str]]] = []  # (identifier, message, fields)
    for data in col.datagrams:
        if target == "syslog":
            m = RFC3164.fullmatch(data)
            assert m is not None, data
            assert int(m[1]) // 8 == 3 and int(m[3]) > 0  # facility daemon, the hook's PID
            lines.append((m[2].decode(), m[4].decode(), {}))
        else:
            entry = journal_entry(data)
            lines.append((entry["SYSLOG_IDENTIFIER"], entry["MESSAGE"], entry))
    hooks = {"vmbatch-prologue", "vmbatch-epilogue", "vmbatch-starter"}
    assert {who for who, _, _ in lines} == hooks, lines
    for who, message, fields in lines:
        assert message.startswith(f"[job {mom.job_id}] "), (who, message)
        if target == "journald":
            assert fields["VMBATCH_JOB_ID"] == mom.job_id, fields
            assert fields["PRIORITY"] in {"3", "4", "6", "7"} and fields["SYSLOG_FACILITY"] == "3"

    def stages(hook: str) -> list[str]:
        found = (STAGE.search(msg) for who, msg, _ in lines if who == hook)
        return [m[1] for m in found if m]

    assert {"image", "disks", "seed", "create", "wait_ssh", "prologue"} <= set(
        stages("vmbatch-prologue")
    )
    assert stages("vmbatch-prologue")[-1] == "prologue"
    assert stages("vmbatch-starter") == ["job"]
    assert stages("vmbatch-epilogue") == ["teardown"]
    assert any("(exit status 3)" in msg for who, msg, _ in lines if who == "vmbatch-starter")
    if target == "journald":
        staged = [f for _, _, f in lines if "VMBATCH_STAGE" in f]
        assert {f["VMBATCH_STAGE"] for f in staged} >= {"wait_ssh", "prologue", "teardown"}
        assert all(float(f["VMBATCH_SECONDS"]) >= 0 for f in staged)

    # The job's vmbatch.log (read while the job ran): the prologue's lines, from the first.
    file_lines = joblog.splitlines()
    assert file_lines and all(
        re.match(rf"\S+ vmbatch-prologue\[\d+\]: \[job {re.escape(mom.job_id)}\] ", ln)
        for ln in file_lines
        if not ln.startswith("    ")
    ), joblog
    assert "stage image took" in joblog and "stage prologue took" in joblog

    everything = "\n".join(
        [
            *(d.decode(errors="replace") for d in col.datagrams),
            joblog,
            pro.stderr.decode(),
            err,
            out,
            epi.stderr.decode(),
        ]
    )
    assert "PRIVATE KEY" not in everything
    for secret in key_lines(job_key) + key_lines(host_key):
        assert secret not in everything


def test_a_missing_socket_falls_back_to_stderr_once(batch_site: BatchSite) -> None:
    """No syslog daemon: the job still runs; the prologue says so once and its lines, with
    the job id, go to its stderr (the scheduler's file) instead."""
    missing = batch_site.site.root / "no-such.sock"
    _use_target(batch_site, f'[log]\ntarget = "syslog"\nsyslog_socket = "{missing}"\n')
    mom = Mom(batch_site, "#!/bin/sh\nexit 0\n")
    pro = mom.prologue()
    assert pro.returncode == 0, pro.stderr.decode()
    status, _, err = _finish(mom.starter())
    assert status == 0 and err == "", err
    epi = mom.epilogue(0)
    assert epi.returncode == 0, epi.stderr.decode()
    text = pro.stderr.decode()
    warning = f"cannot log to syslog at {missing} (No such file or directory)"
    assert text.count(warning) == 1, text
    assert f"vmbatch-prologue[{mom.job_id}]: INFO: stage prologue took" in text
    assert all(ln.startswith(f"vmbatch-prologue[{mom.job_id}]: ") for ln in text.splitlines())


def test_a_slurm_jobs_lines_name_it_and_its_output_has_only_its_own(slurm: SlurmSite) -> None:
    """Through the real slurmd: Prolog, the OCI starter and Epilog log to the test's syslog
    socket with the Slurm job id; the job's output file holds the job's own lines only."""
    sock = slurm.bs.site.root / "syslog.sock"
    _use_target(slurm.bs, f'[log]\ntarget = "syslog"\nsyslog_socket = "{sock}"\n')
    with collecting(sock) as col:
        job_id = slurm.submit("#!/bin/sh\necho to-stdout\necho to-stderr >&2\n")
        job = slurm.settled(job_id)
    assert job["ExitCode"] == "0:0", job
    assert slurm.output(job_id) == "to-stdout\nto-stderr\n"
    lines = []
    for data in col.datagrams:
        m = RFC3164.fullmatch(data)
        assert m is not None, data
        lines.append((m[2].decode(), m[4].decode()))
    assert {who for who, _ in lines} == {"vmbatch-prologue", "vmbatch-starter", "vmbatch-epilogue"}
    assert all(msg.startswith(f"[job {job_id}] ") for _, msg in lines), lines
    stages = {(who, m[1]) for who, msg in lines if (m := STAGE.search(msg))}
    assert {("vmbatch-prologue", "prologue"), ("vmbatch-starter", "job"),
            ("vmbatch-epilogue", "teardown")} <= stages  # fmt: skip
    assert not any("PRIVATE KEY" in msg for _, msg in lines)
