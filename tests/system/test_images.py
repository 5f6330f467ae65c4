"""A guest booted from a downloaded, compressed image, with its per-job extra disks.

Real parts: the fault-injecting HTTP server on 127.0.0.1, the node cache, qemu-img, libvirtd
and a TCG guest (the tiny guest's kernel and initramfs; its root disk is the download).
"""

from __future__ import annotations

import hashlib
import lzma
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.httpserver import Resource, Server, serve
from tests.system.conftest import Site, register
from vmbatch import config
from vmbatch.images.cache import ImageCache


@pytest.fixture
def server() -> Iterator[Server]:
    with serve() as s:
        yield s


def _marked_disk(path: Path) -> bytes:
    """A 64 MiB qcow2 whose first 4 KiB are 0xa5, so the guest can tell it is this disk."""
    subprocess.run(
        ["/usr/bin/qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True
    )
    subprocess.run(
        ["/usr/bin/qemu-io", "-c", "write -P 0xa5 0 4k", str(path)], check=True, capture_output=True
    )
    return path.read_bytes()


def test_downloaded_xz_image_boots_with_cvmfs_and_scratch_disks(
    site: Site, server: Server, guest_dir: Path
) -> None:
    packed = lzma.compress(_marked_disk(site.root / "made.qcow2"))
    server.resources["/images/remote.qcow2.xz"] = Resource(packed)
    entry = re.sub(
        r'^source = ".*"$',
        f'source = "{server.url("/images/remote.qcow2.xz")}"\n'
        f'sha256 = "{hashlib.sha256(packed).hexdigest()}"\n'
        "cvmfs_cache_gib = 2\nscratch_gib = 1",
        register("remote", guest_dir),
        flags=re.M,
    )
    site.write("\n[disks]\nreserve_gib = 1\n" + entry)

    script = (
        "for d in /sys/block/vd*; do"
        ' echo "$(basename $d) $(cat $d/size) $(cat $d/serial 2>/dev/null)"; done;'
        " echo first=$(head -c 4 /dev/vda | od -An -tx1 | tr -d ' ')"
    )
    res = site.vmbatch("run", "--image", "remote", "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr.decode()
    lines = res.stdout.decode().split("\n")
    disks = {ln.split()[0]: ln.split()[1:] for ln in lines if ln.startswith("vd")}
    sectors = 2**30 // 512
    assert disks["vda"] == [str(64 * 2**20 // 512)]  # the downloaded root disk
    assert disks["vdb"] == [str(2 * sectors), "vmbatch-cvmfs"]
    assert disks["vdc"] == [str(1 * sectors), "vmbatch-scratch"]
    assert "vdd" in disks  # the NoCloud seed comes last
    assert "first=a5a5a5a5" in lines  # vda really is the image the server sent

    # Downloaded once, cached unpacked and verifiable, no longer marked in use.
    assert [h.status for h in server.wait_idle()] == [200]
    cache = ImageCache(config.load(site.config))
    [cached] = cache.entries()
    assert cached.jobs == ()
    assert cache.verify(config.load(site.config).images["remote"]) is True
