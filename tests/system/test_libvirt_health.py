"""libvirtd dead or hung under a batch prologue: vmbatch restarts it and the job runs.

Issue 14: "when libvirtd is dead or does not answer, restart it with the configured command
... at most N times per window". These tests stop or kill the libvirtd that `make test`
started (scripts/ensure-libvirtd writes /run/libvirtd.pid), by that PID. The prologue runs
as pbs_mom runs it (tests/system/test_torque.py's ``Mom``); its ``[libvirt].restart_command``
is a script of the test's that SIGKILLs the libvirtd named by the PID file (SIGKILL ends a
stopped process too) and starts a new one with scripts/ensure-libvirtd, as `make test` does.
The ``libvirtd`` fixture leaves libvirtd running and answering whatever happened (SIGCONT,
else scripts/ensure-libvirtd), and the session's ``libvirt_conn`` reopens its connection,
so the tests that follow work.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from tests.system.conftest import BatchSite
from tests.system.libvirtdctl import PIDFILE, is_libvirtd, restart_script, signal_libvirtd
from tests.system.libvirtdctl import pid as libvirtd_pid
from tests.system.test_torque import Mom
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import domain_name

JOB = "#!/bin/sh\necho job ran in $(uname -n)\n"


def _configure(bs: BatchSite) -> Path:
    """Short libvirt timeouts, the test's restart command; returns its run counter."""
    script, runs = restart_script(bs.site.root)
    bs.site.write(
        f"""
[libvirt]
timeout = 5
keepalive_interval = 1
keepalive_count = 2
teardown_timeout = 5
restart_command = ["{script}"]
restart_max = 2
restart_window = 3600
restart_wait = 240
"""
    )
    return runs


class Lines:
    """A process's stderr, line by line as it comes. A thread reads it: ``select`` on a
    buffered pipe misses lines already read into the buffer, so a line could be seen late."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        self.seen: list[bytes] = []
        self._queue: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._pump, args=(proc.stderr,), daemon=True).start()

    def _pump(self, stream: IO[bytes]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(b"")  # end of output

    def wait_for(self, needle: bytes | None, limit: float) -> bool:
        """Read lines until one holds ``needle`` (None: until the end of the output)."""
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                return False
            if not line:
                return needle is None
            self.seen.append(line)
            if needle is not None and needle in line:
                return True
        return False

    def text(self) -> str:
        return b"".join(self.seen).decode()


def _qemu_pids(name: str) -> set[int]:
    """QEMU processes of domain ``name`` (libvirt passes ``-name guest=NAME,``)."""
    needle = f"guest={name},".encode()
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "cmdline").read_bytes():
                found.add(int(proc.name))
        except OSError:
            continue
    return found


def _run_job_and_finish(bs: BatchSite, mom: Mom) -> None:
    """The job runs in the VM the prologue left; the epilogue leaves nothing of it."""
    starter = mom.starter()
    out, err = starter.communicate(timeout=300)
    assert starter.returncode == 0, err.decode()
    assert out.decode().startswith("job ran in vmbatch-"), out.decode()
    epi = mom.epilogue(0)
    assert epi.returncode == 0, epi.stderr.decode()
    (record,) = bs.records()
    assert record["job_id"] == mom.job_id and record["exit_status"] == 0
    assert not _qemu_pids(domain_name(mom.job_id))


def _restarts(bs: BatchSite) -> list[dict[str, object]]:
    """The node's restart record; removed, as it is not the job's (the fixture then checks
    that nothing of the job is left in the state directory)."""
    path = bs.state_dir / "node" / "libvirtd-restarts.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    restarts: list[dict[str, object]] = json.loads(path.read_text())["restarts"]
    shutil.rmtree(path.parent)
    return restarts


def test_a_stopped_libvirtd_is_restarted_and_the_job_then_runs(
    batch_site: BatchSite, libvirtd: int, libvirt_conn: Connection
) -> None:
    """libvirtd SIGSTOPped before the prologue: its first call gives up after
    [libvirt].timeout, the probe names the stopped libvirtd, the restart command replaces
    it, and the prologue's second attempt boots the job's VM."""
    runs = _configure(batch_site)
    mom = Mom(batch_site, JOB)
    signal_libvirtd(libvirtd, signal.SIGSTOP)
    try:
        pro = mom.prologue()
    finally:
        if is_libvirtd(libvirtd):
            os.kill(libvirtd, signal.SIGCONT)
    log = pro.stderr.decode()
    assert pro.returncode == 0, log
    assert "libvirt did not connect to qemu:///system within 5s" in log  # cut off at the bound
    assert (
        "libvirtd restarted (1/2 in the last 3600 s): libvirtd does not answer within 5 s"
        f" (pid {libvirtd} is stopped)"
    ) in log, log
    new = libvirtd_pid()
    assert new != libvirtd and is_libvirtd(new), "a new libvirtd runs"
    assert not is_libvirtd(libvirtd), "the stopped one is gone"
    assert runs.read_text() == "run\n", "one restart"
    (restart,) = _restarts(batch_site)
    assert str(restart["reason"]).startswith("libvirtd does not answer within 5 s")
    assert libvirt_conn.is_running(domain_name(mom.job_id))
    _run_job_and_finish(batch_site, mom)
    print(log)


def test_libvirtd_killed_during_boot_is_restarted_and_the_job_then_runs(
    batch_site: BatchSite, libvirtd: int, libvirt_conn: Connection
) -> None:
    """kill -9 of libvirtd while the job's VM boots: the prologue loses its connection, its
    teardown cannot reach libvirtd, the probe finds libvirtd dead, the restart command starts
    a new one; the first VM does not survive, the second attempt boots a new one, and the
    job runs in that."""
    runs = _configure(batch_site)
    mom = Mom(batch_site, JOB)
    proc = subprocess.Popen(
        mom.prologue_argv(),
        env=mom._root_env(),
        cwd=mom.mom_priv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        umask=0o077,
    )
    lines = Lines(proc)
    name = domain_name(mom.job_id)
    try:
        assert lines.wait_for(b"SSH forwarded", 300), lines.text()
        first = _qemu_pids(name)
        assert len(first) == 1, first
        # The guest needs seconds more to boot under TCG: libvirtd dies during the boot.
        signal_libvirtd(libvirtd, signal.SIGKILL)
        assert lines.wait_for(None, 400), lines.text()
        proc.wait(timeout=60)
        log = lines.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log
    assert (
        "libvirtd restarted (1/2 in the last 3600 s): libvirtd is dead"
        f" (pid {libvirtd} from {PIDFILE} is gone)"
    ) in log, log
    # The first VM's QEMU outlived libvirtd; it is gone now (the new libvirtd either found
    # it again and the second attempt's clean-up destroyed it, or killed it itself when it
    # could not take it over: both were seen), and one QEMU runs, the job's new VM.
    (second,) = _qemu_pids(name)
    assert second not in first
    assert libvirt_conn.is_running(name)
    assert runs.read_text() == "run\n", "one restart"
    assert len(_restarts(batch_site)) == 1
    _run_job_and_finish(batch_site, mom)
    print(log)
