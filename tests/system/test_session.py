"""Jobs run detached in the guest (vmbatch/guest/session.py), with the tiny guest.

The job-contract tests share one booted guest (``guest`` fixture, one boot for the module);
each starts its own job in it. Tests about vmbatch's own process (signals, walltime) run
``vmbatch run`` and boot their own guest.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.system.conftest import TEST_BASE, Site, site_config
from vmbatch import config, lifecycle
from vmbatch.errors import Disposition, GuestLostError
from vmbatch.guest.session import GuestJob, Session, command_script
from vmbatch.job import interactive
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import domain_name


@pytest.fixture(scope="module")
def guest(guest_dir: Path, libvirt_conn: Connection) -> Iterator[lifecycle.Guest]:
    root = TEST_BASE / f"session-{time.monotonic_ns()}"
    root.mkdir(parents=True, mode=0o755)
    cfg_file = root / "vmbatch.toml"
    cfg_file.write_text(site_config(guest_dir, root / "jobs", root / "console"))
    cfg = config.load(cfg_file)
    job = interactive("demo", ("true",))
    try:
        with lifecycle.booted(cfg, job) as g:
            yield g
        assert not any((root / "jobs").iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(guest: lifecycle.Guest, script: str, **kw: object) -> tuple[int, bytes, bytes, Session]:
    job = GuestJob(job_id=f"t{time.monotonic_ns()}", script=script.encode(), **kw)  # type: ignore[arg-type]
    session = guest.session(job)
    session.start()
    out, err = io.BytesIO(), io.BytesIO()
    status = session.follow(out, err)
    return status, out.getvalue(), err.getvalue(), session


@pytest.mark.parametrize(
    "script,status",
    [
        ("exit 0", 0),
        ("exit 1", 1),
        ("exit 7", 7),
        ("exit 255", 255),
        ("kill -9 $$", 128 + 9),
        ("kill -TERM $$", 128 + 15),
    ],
)
def test_exit_status_comes_back_exactly(guest: lifecycle.Guest, script: str, status: int) -> None:
    assert _run(guest, f"#!/bin/sh\n{script}\n")[0] == status


def test_ten_mb_of_mixed_binary_output_is_byte_exact_and_separated(
    guest: lifecycle.Guest,
) -> None:
    # 80 rounds of 64 KiB random bytes to each stream, alternating; the guest keeps copies.
    script = (
        "#!/bin/sh\nrm -f /tmp/exp-out /tmp/exp-err\ni=0\nwhile [ $i -lt 80 ]; do\n"
        "  head -c 65536 /dev/urandom | tee -a /tmp/exp-out\n"
        "  head -c 65536 /dev/urandom | tee -a /tmp/exp-err >&2\n"
        "  i=$((i + 1))\ndone\n"
    )
    status, out, err, _ = _run(guest, script)
    assert status == 0
    assert len(out) == len(err) == 80 * 65536
    _, sums, _, _ = _run(guest, "#!/bin/sh\nsha256sum /tmp/exp-out /tmp/exp-err\n")
    expected = [line.split()[0].decode() for line in sums.splitlines()]
    assert [hashlib.sha256(out).hexdigest(), hashlib.sha256(err).hexdigest()] == expected


def test_output_survives_dropped_connections(guest: lifecycle.Guest) -> None:
    """The SSH transport is cut twice while the job writes: every line arrives once."""
    script = (
        "#!/bin/sh\ni=0\nwhile [ $i -lt 100 ]; do echo line $i; echo err $i >&2;"
        " i=$((i + 1)); usleep 50000; done\nexit 3\n"
    )
    job = GuestJob(job_id=f"drop{time.monotonic_ns()}", script=script.encode())
    session = guest.session(job)
    session.start()
    out, err = io.BytesIO(), io.BytesIO()
    cuts: list[int] = []

    def cut() -> None:  # as if the network dropped, twice, while the job writes
        for n in range(2):
            deadline = time.monotonic() + 30
            while session.reconnects < n and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.5)
            client = session.client
            transport = client.get_transport() if client is not None else None
            if transport is not None:
                transport.close()
                cuts.append(n)

    cutter = threading.Thread(target=cut)
    cutter.start()
    try:
        result = [session.follow(out, err)]  # signals can only be handled in the main thread
    finally:
        cutter.join(timeout=60)
    assert cuts == [0, 1]  # both cuts happened while the job was still writing (5 s+)
    assert result == [3]
    assert session.reconnects >= 2
    assert out.getvalue().decode().splitlines() == [f"line {i}" for i in range(100)]
    assert err.getvalue().decode().splitlines() == [f"err {i}" for i in range(100)]


def test_hostile_environment_and_script_content_are_passed_verbatim(
    guest: lifecycle.Guest,
) -> None:
    hostile = "a'b\"c $(reboot) `id` ; exit 9\nsecond line \\ end"
    job = GuestJob(
        job_id="x'; reboot; '",
        script=command_script(("printf", "%s|%s", "$(uname)", "it's")) + b"",
        environment={"HOSTILE": hostile, "OK": "1"},
    )
    session = guest.session(job)
    session.start()
    out, err = io.BytesIO(), io.BytesIO()
    assert session.follow(out, err) == 0
    assert out.getvalue() == b"$(uname)|it's"
    status, env_out, _, _ = _run(
        guest, '#!/bin/sh\nprintf %s "$HOSTILE"\n', environment={"HOSTILE": hostile}
    )
    assert (status, env_out.decode()) == (0, hostile)


def test_missing_working_directory_is_a_clear_message(guest: lifecycle.Guest) -> None:
    status, out, err, _ = _run(guest, "#!/bin/sh\necho ran\n", workdir="/no/such dir")
    assert status == 1 and out == b""
    assert b"vmbatch: the working directory /no/such dir does not exist in the guest" in err


def test_sigterm_reaches_the_job_in_the_guest(site: Site) -> None:
    """SIGTERM to `vmbatch run` is forwarded: the job's trap runs, its status comes back."""
    script = "trap 'echo got-term; exit 42' TERM; echo ready; while :; do usleep 100000; done"
    proc = site.popen("run", "--image", "demo", "--", "sh", "-c", script)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 42, err.decode()
    assert out == b"got-term\n"


def test_walltime_is_enforced_inside_the_guest(site: Site) -> None:
    script = "trap 'echo walltime-term; exit 9' TERM; while :; do usleep 100000; done"
    res = site.vmbatch("run", "--image", "demo", "--walltime", "2", "--", "sh", "-c", script)
    assert res.returncode == 9, res.stderr.decode()
    assert res.stdout == b"walltime-term\n"


def test_guest_that_powers_off_mid_job_fails_the_job_clearly(site: Site) -> None:
    res = site.vmbatch(
        "run", "--image", "demo", "--", "sh", "-c", "echo before; sleep 2; poweroff -f"
    )
    assert res.stdout == b"before\n"
    assert res.returncode == 65, res.stderr.decode()  # ABORT_JOB: not requeued
    assert b"the VM stopped while the job was running" in res.stderr


class _Watch(io.BytesIO):
    """An output stream that signals when a marker has been written."""

    def __init__(self, marker: bytes) -> None:
        super().__init__()
        self.marker, self.seen = marker, threading.Event()

    def write(self, data: bytes) -> int:  # type: ignore[override]
        n = super().write(data)
        if self.marker in self.getvalue():
            self.seen.set()
        return n


def test_guest_that_hangs_mid_job_fails_the_job_clearly(site: Site) -> None:
    """A paused VM keeps its forwarded port open but answers nothing: the liveness check
    notices, reconnecting fails for reconnect_timeout, and the job ends with a message."""
    site.write("[ssh]\nliveness_interval = 2\nreconnect_timeout = 5\nconnect_timeout = 3\n")
    cfg = config.load(site.config)
    job = interactive("demo", ("sh", "-c", "echo started; sleep 600"))
    out, err = _Watch(b"started\n"), io.BytesIO()

    def pause() -> None:
        if out.seen.wait(120):
            conn = libvirt.open("qemu:///system")
            try:
                conn.lookupByName(domain_name(job.job_id)).suspend()
            finally:
                conn.close()

    pauser = threading.Thread(target=pause)
    pauser.start()
    try:
        with pytest.raises(GuestLostError, match="stopped answering") as info:
            lifecycle.run_job(cfg, job, out, err)
    finally:
        pauser.join(timeout=10)
    assert out.getvalue() == b"started\n"
    assert info.value.disposition is Disposition.ABORT_JOB
