"""The Debian bookworm guest with the real cloud-init: our NoCloud seed, for real.

One boot (about one to two minutes under TCG): cloud-init must create the job's user with
the job's uid, gid and supplementary group, give it the per-job key, serve the pinned
Ed25519 host key, set the hostname, refuse password logins and apply the site's merged
cloud-config snippet; the base image stays as it was.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from tests.system.conftest import Site, built_guest, register
from vmbatch import config, lifecycle
from vmbatch.job import JobUser, interactive


@pytest.fixture(scope="module")
def debian_dir() -> Path:
    return built_guest("debian")


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_cloud_init_creates_the_job_user_from_the_seed(site: Site, debian_dir: Path) -> None:
    snippet = site.root / "site-user-data.yaml"
    snippet.write_text(
        "write_files:\n- path: /etc/vmbatch-site\n  content: site snippet applied\n"
        "  permissions: '0644'\n"
    )
    site.write(f'\n[context]\nsite_user_data = "{snippet}"\n' + register("debian", debian_dir))
    before = _sha(debian_dir / "disk.qcow2")
    alice = JobUser("alice", 4242, 4343, "physics", "/home/alice", (("atlas", 5000),))
    script = (
        "echo uid=$(id -u) gid=$(id -g) groups=$(id -G | tr ' ' ,) user=$(id -un);"
        " echo host=$(hostname);"
        ' echo home=$HOME owner=$(stat -c %u:%g "$HOME");'
        " ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
        " -o PreferredAuthentications=password,keyboard-interactive localhost true 2>&1"
        " | tail -n 1;"
        " cloud-init status --wait | tail -n 1;"
        " cat /etc/vmbatch-site"
    )
    job = interactive("debian", ("sh", "-c", script), identity=alice)
    out, err = io.BytesIO(), io.BytesIO()
    status = lifecycle.run_job(config.load(site.config), job, out, err)
    assert status == 0, err.getvalue().decode()
    lines = out.getvalue().decode().splitlines()
    assert lines[0] == "uid=4242 gid=4343 groups=4343,5000 user=alice"
    assert lines[1] == f"host=vmbatch-{job.job_id}"
    assert lines[2] == "home=/home/alice owner=4242:4343"
    assert "Permission denied (publickey)" in lines[3]  # no password login offered
    assert lines[4] == "status: done"  # cloud-init finished without errors
    assert lines[5] == "site snippet applied"  # the site's snippet was merged
    [console] = site.console_dir.glob("*.log")
    log = console.read_text(errors="replace")
    assert "Datasource DataSourceNoCloud" in log
    assert "Invalid cloud-config" not in log  # our user-data passes cloud-init's schema
    assert _sha(debian_dir / "disk.qcow2") == before
