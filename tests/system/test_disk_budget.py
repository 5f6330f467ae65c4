"""One runaway job cannot fill the node's job directory for the others ([disks].job_max_gib).

A Debian guest (its root file system is the job's overlay on the host, unlike the tiny
guest's initramfs) runs a job that writes random data without end; the tiny guest runs a
second job meanwhile. The first is ended with a message naming the limit, the second
completes, and neither leaves anything behind (the ``site`` fixture checks).
"""

from __future__ import annotations

from pathlib import Path

from tests.system.conftest import Site, built_guest, register

LIMIT_GIB = 0.5


def _overlay_bytes(job_dir: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in job_dir.glob("*/overlay.qcow2"))


def test_a_job_that_writes_without_limit_is_ended_and_the_next_job_completes(
    site: Site,
) -> None:
    site.write(
        register("debian", built_guest("debian")) + f"\n[disks]\njob_max_gib = {LIMIT_GIB}\n"
    )
    writer = site.popen(
        "run", "--image", "debian", "--", "sh", "-c",
        "echo writing; dd if=/dev/urandom of=/var/tmp/fill bs=1M 2>/dev/null; echo dd-ended",
    )  # fmt: skip
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"writing\n"  # booted; the overlay now grows
        second = site.vmbatch("run", "--image", "demo", "--", "echo", "second job")
        assert second.returncode == 0, second.stderr.decode()
        assert second.stdout == b"second job\n"
        out, err = writer.communicate(timeout=600)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    text = err.decode()
    assert writer.returncode == 65, text
    assert f"more than the {LIMIT_GIB:g} GiB a job may take" in text and "job_max_gib" in text
    assert b"dd-ended" not in out, "the job was killed, not left to run on"
    assert _overlay_bytes(site.job_dir) == 0, "its disks went with it"
