"""Offline injection's refusals with the real libguestfs (one appliance boot per case).

The successful path boots a guest: tests/system/test_debian_guest.py.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from vmbatch import config
from vmbatch.contextualize import ContextSpec, get_method
from vmbatch.contextualize.keys import generate
from vmbatch.errors import Disposition, ImageError, InjectionToolError
from vmbatch.images.catalog import resolve
from vmbatch.images.disks import create_overlay
from vmbatch.job import JobUser
from vmbatch.state import JobDir

SPEC = ContextSpec(
    instance_id="vmbatch-t",
    hostname="vmbatch-t",
    user=JobUser("alice", 4242, 4343, "physics", "/home/alice"),
    authorized_keys=(generate("client").public_openssh,),
    host_key=generate("host"),
)


def _cfg(tmp_path: Path, base: Path, **tools: str) -> config.Config:
    (tmp_path / "cache").mkdir(exist_ok=True)
    return config.parse(
        {
            "paths": {"job_dir": str(tmp_path / "jobs"), "cache_dir": str(tmp_path / "cache")},
            "tools": tools,
            "images": {"x": {"source": str(base), "format": "raw"}},
        }
    )


def _ext4_without_os(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "data").mkdir(parents=True)
    (tree / "data" / "README").write_text("not an operating system\n")
    base = tmp_path / "data.raw"
    with base.open("wb") as fh:
        fh.truncate(64 * 2**20)
    subprocess.run(
        ["/sbin/mkfs.ext4", "-q", "-F", "-d", str(tree), str(base)], check=True, timeout=60
    )
    return base


def _guestfish_children() -> set[int]:
    """PIDs of the guestfish processes running now."""
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() == "guestfish":
                    found.add(int(proc.name))
            except OSError:
                continue
    return found


def test_image_without_linux_system_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    base = _ext4_without_os(tmp_path)
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    cfg = _cfg(tmp_path, base)
    jobdir = JobDir(cfg.paths.job_dir, "t").create()
    create_overlay(cfg, resolve(cfg, "x"), jobdir.overlay)
    running = _guestfish_children()
    with pytest.raises(ImageError, match=r"no Linux root filesystem.*/dev/sda: ext4") as info:
        get_method("inject", cfg).prepare(SPEC, jobdir)
    assert info.value.disposition is Disposition.ABORT_JOB
    assert "nocloud" in str(info.value)  # the fix is named
    assert sorted(p.name for p in jobdir.path.iterdir()) == ["keys", "overlay.qcow2"]
    assert _guestfish_children() <= running  # the appliance was stopped
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before


def test_missing_libguestfs_is_a_node_problem(tmp_path: Path) -> None:
    base = _ext4_without_os(tmp_path)
    cfg = _cfg(tmp_path, base, guestfish=str(tmp_path / "no-guestfish"))
    jobdir = JobDir(cfg.paths.job_dir, "t").create()
    with pytest.raises(InjectionToolError, match="install libguestfs-tools") as info:
        get_method("inject", cfg).prepare(SPEC, jobdir)
    assert info.value.disposition is Disposition.OFFLINE_NODE
