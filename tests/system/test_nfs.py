"""Shared filesystems for real: the Debian guest mounts an NFS-Ganesha export on the host.

Ganesha listens on 127.0.0.1 (tests/system/nfsserver.py); the guest reaches it at the
user-mode gateway 10.0.2.2, which needs ``outbound_network = true``. The Debian test guest
has no DNS resolver (guests/debian/build.sh), so with outbound traffic allowed it still
sends nothing beyond this machine. The export is mounted in the guest at the path where it
lies on the host, so the job's working directory is the same path on both sides.

One boot per behaviour: a job writes into its NFS working directory (real cloud-init, which
also installs the admin key for root); the server comes up 10 s after the first failed
mount (HEPiX context CD); the server never comes (a requeue, within the mount's budget).
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

import pytest

from tests.system.conftest import ALICE, Site, built_guest, mount_config, register
from tests.system.nfsserver import NfsServer
from vmbatch import config, lifecycle
from vmbatch.errors import Disposition, MountError
from vmbatch.hooks.exitcodes import CLI as EXIT_CODES
from vmbatch.job import interactive

#: The job: where it runs, what it wrote (owner as the guest sees it), what is mounted there.
SCRIPT = (
    "pwd; echo written-in-guest > result.txt; stat -c %u:%g result.txt;"
    " findmnt -n -o FSTYPE,SOURCE --target . | tr -s ' '"
)


@pytest.fixture(scope="module")
def debian_dir() -> Path:
    return built_guest("debian")


def _run_alice(site: Site, image: str, workdir: Path) -> tuple[int, list[str], str]:
    job = interactive(image, ("sh", "-c", SCRIPT), identity=ALICE, workdir=str(workdir))
    out, err = io.BytesIO(), io.BytesIO()
    status = lifecycle.run_job(config.load(site.config), job, out, err)
    return status, out.getvalue().decode().splitlines(), err.getvalue().decode()


def _assert_written(server: NfsServer, lines: list[str]) -> None:
    workdir = server.export / "alice"
    assert lines == [str(workdir), "4242:4343", "nfs4 10.0.2.2:/export"]
    result = workdir / "result.txt"
    assert result.read_text() == "written-in-guest\n"
    st = result.stat()
    assert (st.st_uid, st.st_gid) == (ALICE.uid, ALICE.gid)  # the host sees the job's uid


def test_job_writes_into_its_nfs_workdir(site: Site, debian_dir: Path, nfs: NfsServer) -> None:
    nfs.start()
    mount_config(site, nfs)
    site.write(register("debian", debian_dir, context="nocloud"))
    status, lines, err = _run_alice(site, "debian", nfs.export / "alice")
    assert status == 0, err
    _assert_written(nfs, lines)


class _FirstFailure(logging.Handler):
    """Starts the server ``delay`` seconds after the first failed mount attempt is logged."""

    def __init__(self, server: NfsServer, delay: float) -> None:
        super().__init__(logging.WARNING)
        self.failures = 0
        self.timer = threading.Timer(delay, server.start)

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("NfsMountPolicy: attempt"):
            self.failures += 1
            if self.failures == 1:
                self.timer.start()


def test_server_late_mount_retries(site: Site, debian_dir: Path, nfs: NfsServer) -> None:
    mount_config(site, nfs)
    site.write(register("hepix", debian_dir, "disk-hepix.qcow2", "cernvm"))
    watcher = _FirstFailure(nfs, 10.0)
    logger = logging.getLogger("vmbatch.retry")
    logger.addHandler(watcher)
    try:
        status, lines, err = _run_alice(site, "hepix", nfs.export / "alice")
    finally:
        logger.removeHandler(watcher)
        watcher.timer.cancel()
        watcher.timer.join()
    assert status == 0, err
    assert watcher.failures >= 2  # refused while down, retried until the server was up
    _assert_written(nfs, lines)


def test_server_never_comes(site: Site, debian_dir: Path, nfs: NfsServer) -> None:
    mount_config(site, nfs, timeout=20, attempt=10)
    site.write(register("hepix", debian_dir, "disk-hepix.qcow2", "cernvm"))
    job = interactive("hepix", ("sh", "-c", "echo job ran"), identity=ALICE)
    out, err, timings = io.BytesIO(), io.BytesIO(), dict[str, float]()
    with pytest.raises(MountError) as exc:
        lifecycle.run_job(config.load(site.config), job, out, err, timings=timings)
    assert out.getvalue() == b"" and "start" not in timings  # the job never started
    assert exc.value.disposition is Disposition.REQUEUE  # a node problem, not the job's
    assert EXIT_CODES[exc.value.disposition] == 75  # what `vmbatch run` exits with
    text = str(exc.value)
    assert text.startswith(f"could not mount NFS server 127.0.0.1:{nfs.port}, export /export")
    assert "attempts in 20s" in text and "raise [mounts.data].timeout" in text
    # The budget holds: 20 s, plus at most one back-off (8 s) and a last short attempt.
    assert timings["mount"] <= 20 + 8 + 10
