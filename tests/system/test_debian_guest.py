"""The Debian bookworm guests, one boot per contextualization method, for real.

Each boot (about one to two minutes under TCG; those without NFS run at the same time) must
give the job's user its uid, gid and supplementary group, the per-job key, the pinned
Ed25519 host key (vmbatch refuses any other), the hostname, a home owned by the user, and no
password logins; the base image stays as it was. The guests (guests/debian/build.sh) are:

- ``disk.qcow2`` with the real cloud-init: ``nocloud`` and ``cernvm`` (whose multipart
  user-data reaches cloud-init through the NoCloud volume);
- ``disk-hepix.qcow2``, no cloud-init, with a reader of the HEPiX context CD
  (guests/debian/hepix-context): ``cernvm`` through the ``CONTEXT`` CD and ``context.sh``;
- ``disk-plain.qcow2``, no contextualization agent at all: ``inject``, with an NFS mount,
  so the injected root key for vmbatch is used too (the other methods' root key is used
  by tests/system/test_nfs.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
from pathlib import Path

import pytest

from tests.system.conftest import (
    ALICE,
    Site,
    built_guest,
    mount_config,
    register,
    together,
)
from tests.system.nfsserver import NfsServer
from vmbatch import config, lifecycle
from vmbatch.job import JobSpec, interactive
from vmbatch.state import safe_job_id

#: The job's user, with node groups that meet Debian's own (base-passwd: dialout 20, sudo 27,
#: users 100): atlas is new, dialout the same, mysql's gid is the image's sudo (not given),
#: users is 100 in the image (5100 becomes vmbatch-g5100), docker is privileged by name.
USER = dataclasses.replace(
    ALICE,
    groups=(("atlas", 5000), ("dialout", 20), ("mysql", 27), ("users", 5100), ("docker", 998)),
)
#: What the job prints: its identity, host, home, and how a password login attempt ends.
IDENTITY_SCRIPT = (
    "echo uid=$(id -u) gid=$(id -g) groups=$(id -G | tr ' ' ,) user=$(id -un)"
    " group=$(id -gn) names=$(id -Gn | tr ' ' ,);"
    " echo host=$(hostname);"
    ' echo home=$HOME owner=$(stat -c %u:%g "$HOME");'
    " ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
    " -o PreferredAuthentications=password,keyboard-interactive localhost true 2>&1"
    " | tail -n 1;"
)


@pytest.fixture(scope="module")
def debian_dir() -> Path:
    return built_guest("debian")


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _run(
    site: Site, image: str, extra: str, cfg: Path | None = None
) -> tuple[JobSpec, list[str], str]:
    """Run IDENTITY_SCRIPT + ``extra`` as alice (with the site's configuration, or ``cfg``);
    return the job, its lines, its console."""
    job = interactive(image, ("sh", "-c", IDENTITY_SCRIPT + extra), identity=USER)
    out, err = io.BytesIO(), io.BytesIO()
    status = lifecycle.run_job(config.load(cfg or site.config), job, out, err)
    assert status == 0, f"{image}: {err.getvalue().decode()}"
    console = site.console_dir / f"{safe_job_id(job.job_id)}.log"
    return job, out.getvalue().decode().splitlines(), console.read_text(errors="replace")


def _assert_identity(job: JobSpec, lines: list[str]) -> None:
    fields = dict(f.split("=", 1) for f in lines[0].split())
    assert (fields["uid"], fields["gid"], fields["user"], fields["group"]) == (
        "4242",
        "4343",
        "alice",
        "physics",
    )
    # The node's names where the image allows them (any order after the primary group).
    gids, names = fields["groups"].split(","), fields["names"].split(",")
    assert (gids[0], names[0]) == ("4343", "physics")
    assert sorted(zip(gids[1:], names[1:], strict=True)) == sorted(
        [("20", "dialout"), ("5000", "atlas"), ("5100", "vmbatch-g5100")]
    )  # not 27 (the image's sudo), not docker
    assert lines[1] == f"host=vmbatch-{job.job_id}"
    assert lines[2] == "home=/home/alice owner=4242:4343"
    assert "Permission denied (publickey)" in lines[3]  # no password login offered


def test_each_context_method_creates_the_job_user(site: Site, debian_dir: Path) -> None:
    """``nocloud`` and ``cernvm`` through the image's cloud-init, ``cernvm`` through the
    HEPiX context CD reader of an image without cloud-init. Independent boots of a minute
    or more each under TCG: they run at the same time (together)."""
    hepix_config = site.root / "hepix.toml"
    hepix_config.write_text(
        site.config.read_text()
        + '\n[context]\ncvmfs_repositories = ["atlas.cern.ch", "sft.cern.ch"]\n'
        'cvmfs_http_proxy = "http://127.0.0.1:3128;DIRECT"\n'
        + register("hepix", debian_dir, "disk-hepix.qcow2", "cernvm")
    )
    snippet = site.root / "site-user-data.yaml"
    snippet.write_text(
        "write_files:\n- path: /etc/vmbatch-site\n  content: site snippet applied\n"
        "  permissions: '0644'\n"
    )
    site.write(
        f'\n[context]\nsite_user_data = "{snippet}"\ncvmfs_repositories = ["atlas.cern.ch"]\n'
        + register("debian-nocloud", debian_dir, context="nocloud")
        + register("debian-cernvm", debian_dir, context="cernvm")
    )
    before = {disk: _sha(debian_dir / disk) for disk in ("disk.qcow2", "disk-hepix.qcow2")}
    cloud_init = " cloud-init status --wait | tail -n 1; cat /etc/vmbatch-site"
    hepix_reader = " dpkg-query -W cloud-init 2>&1 | tail -n 1"
    *cloud_runs, hepix = together(
        functools.partial(_run, site, "debian-nocloud", cloud_init),
        functools.partial(_run, site, "debian-cernvm", cloud_init),
        functools.partial(_run, site, "hepix", hepix_reader, hepix_config),
    )

    for job, lines, console in cloud_runs:
        _assert_identity(job, lines)
        assert lines[4] == "status: done"  # cloud-init finished without errors
        assert lines[5] == "site snippet applied"  # the site's snippet was merged
        assert "Datasource DataSourceNoCloud" in console
        # The boot script says why gid 27 is left out (cloud-init copies bootcmd's output).
        assert "vmbatch: groups: not given: gid 27 (mysql on the node) is the image's" in console
        assert "Invalid cloud-config" not in console  # our user-data passes cloud-init's schema

    job, lines, console = hepix
    _assert_identity(job, lines)
    assert "no packages found matching cloud-init" in lines[4]  # only the HEPiX reader ran
    assert "hepix-context: context from /dev/vd" in console
    assert "hepix-context: user alice uid 4242 gid 4343" in console

    assert {disk: _sha(debian_dir / disk) for disk in before} == before


def test_offline_injection_into_an_image_without_agent(
    site: Site, debian_dir: Path, nfs: NfsServer
) -> None:
    # With a mount: vmbatch logs in as root with the injected admin key to mount it.
    nfs.start()
    mount_config(site, nfs)
    site.write(register("plain", debian_dir, "disk-plain.qcow2", "inject"))
    before = _sha(debian_dir / "disk-plain.qcow2")
    job, lines, _ = _run(
        site,
        "plain",
        " dpkg-query -W cloud-init 2>&1 | tail -n 1; ls /etc/ssh | grep host;"
        f" findmnt -n -o FSTYPE {nfs.export}",
    )
    _assert_identity(job, lines)
    assert "no packages found matching cloud-init" in lines[4]
    # The image had keys of every type: only the pinned one is left.
    assert lines[5:7] == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
    assert lines[7:] == ["nfs4"]
    assert _sha(debian_dir / "disk-plain.qcow2") == before
