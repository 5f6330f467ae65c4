"""Base-image inspection and per-job overlays with the real qemu-img."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vmbatch import config
from vmbatch.errors import (
    DiskSpaceError,
    Disposition,
    HostError,
    ImageError,
    UnknownImageError,
)
from vmbatch.images.catalog import resolve
from vmbatch.images.disks import check_free_space, create_blank, create_overlay, job_disks
from vmbatch.state import JobDir

QEMU_IMG = "/usr/bin/qemu-img"


def _cfg(**images: dict[str, str]) -> config.Config:
    return config.parse({"images": images})


def _img(path: Path, fmt: str, size: str) -> Path:
    subprocess.run([QEMU_IMG, "create", "-q", "-f", fmt, str(path), size], check=True)
    return path


def test_qcow2_and_raw_are_accepted_and_format_detected(tmp_path: Path) -> None:
    q = _img(tmp_path / "a.qcow2", "qcow2", "1G")
    r = _img(tmp_path / "b.img", "raw", "16M")
    cfg = _cfg(a={"source": str(q)}, b={"source": str(r), "memory": 300})
    a, b = resolve(cfg, "a"), resolve(cfg, "b")
    assert (a.format, a.virtual_size) == ("qcow2", 2**30)
    assert (b.format, b.memory, b.vcpus) == ("raw", 300, 1)


def test_backing_file_is_refused(tmp_path: Path) -> None:
    base = _img(tmp_path / "base.qcow2", "qcow2", "64M")
    top = tmp_path / "top.qcow2"
    subprocess.run(
        [QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(top)],
        check=True,
    )
    with pytest.raises(ImageError, match=r"has a backing file .*refused for safety"):
        resolve(_cfg(t={"source": str(top)}), "t")


@pytest.mark.parametrize("raw", ["on", "off"])
def test_external_data_file_is_refused(tmp_path: Path, raw: str) -> None:
    # The guest would read (and with data_file_raw=on, see verbatim) another host file.
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:$6$hash:19000:0:99999:7:::\n".ljust(1024 * 1024, b"\0"))
    img = tmp_path / "df.qcow2"
    subprocess.run(
        [QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw={raw}",
         str(img), "1M"],
        check=True,
    )  # fmt: skip
    with pytest.raises(ImageError, match=rf"has an external data file \({secret}\); refused"):
        resolve(_cfg(t={"source": str(img)}), "t")
    secret.unlink()  # still named in the image: refused before anything opens it
    with pytest.raises(ImageError, match="external data file"):
        resolve(_cfg(t={"source": str(img), "format": "qcow2"}), "t")


def test_non_image_file_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("this is not a disk\n")
    with pytest.raises(ImageError, match="does not look like a disk image"):
        resolve(_cfg(t={"source": str(text)}), "t")
    with pytest.raises(ImageError, match="not a usable disk image"):
        resolve(_cfg(t={"source": str(text), "format": "qcow2"}), "t")


def test_declared_format_must_match(tmp_path: Path) -> None:
    raw = _img(tmp_path / "r.img", "raw", "16M")
    with pytest.raises(ImageError, match="not a usable disk image"):
        resolve(_cfg(r={"source": str(raw), "format": "qcow2"}), "r")


def test_root_may_name_a_local_file_but_jobs_may_not(tmp_path: Path) -> None:
    q = _img(tmp_path / "local.qcow2", "qcow2", "64M")
    assert resolve(_cfg(), str(q), allow_path=True).name == "local.qcow2"
    with pytest.raises(UnknownImageError, match="jobs may only use catalog images"):
        resolve(_cfg(), str(q))


def test_overlay_is_metadata_only_and_never_writes_the_base(tmp_path: Path) -> None:
    base = _img(tmp_path / "huge.qcow2", "qcow2", "200G")
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    cfg = _cfg(h={"source": str(base)})
    img = resolve(cfg, "h")
    overlay = create_overlay(cfg, img, tmp_path / "overlay.qcow2")
    # Size independent of the base's virtual size: only qcow2 headers are written.
    assert overlay.stat().st_size < 1024 * 1024
    assert overlay.stat().st_mode & 0o777 == 0o600
    subprocess.run(
        ["/usr/bin/qemu-io", "-c", "write -P 0xab 0 1M", str(overlay)],
        check=True,
        capture_output=True,
    )
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest
    info = subprocess.run(
        [QEMU_IMG, "info", "--output=json", str(overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert str(base) in info


def test_job_disks_are_sparse_sized_and_in_guest_order(tmp_path: Path) -> None:
    base = _img(tmp_path / "base.qcow2", "qcow2", "64M")
    cfg = config.parse(
        {
            "disks": {"cvmfs_cache_gib": 20},
            "images": {
                "c": {"source": str(base), "scratch_gib": 100},
                "plain": {"source": str(base), "cvmfs_cache_gib": 0},
            },
        }
    )
    jobdir = JobDir(tmp_path / "jobs", "7").create()
    disks = job_disks(cfg, resolve(cfg, "c"), jobdir)
    assert [d.path for d in disks] == [jobdir.overlay, jobdir.cvmfs_cache, jobdir.scratch]
    assert [d.serial for d in disks] == [None, "vmbatch-cvmfs", "vmbatch-scratch"]
    for disk, gib in zip(disks[1:], (20, 100), strict=True):
        info = json.loads(
            subprocess.run(
                [QEMU_IMG, "info", "--output=json", str(disk.path)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        assert (info["format"], info["virtual-size"]) == ("qcow2", gib * 2**30)
        assert disk.path.stat().st_blocks * 512 < 2**20  # sparse: created, not allocated
        assert disk.path.stat().st_mode & 0o777 == 0o600
    other = JobDir(tmp_path / "jobs", "8").create()
    assert len(job_disks(cfg, resolve(cfg, "plain"), other)) == 1  # image opted out
    jobdir.remove()
    assert not jobdir.path.exists()


def test_free_space_guard_requeues(tmp_path: Path) -> None:
    ok = config.parse({"paths": {"job_dir": str(tmp_path / "j"), "cache_dir": str(tmp_path)}})
    check_free_space(ok)  # default reserve (5 GiB) on this machine's disk
    short = config.parse(
        {
            "paths": {"job_dir": str(tmp_path / "not" / "yet"), "cache_dir": str(tmp_path)},
            "disks": {"reserve_gib": 10**9},
        }
    )
    with pytest.raises(DiskSpaceError, match=r"job_dir.*\[disks\]\.reserve_gib") as info:
        check_free_space(short)
    assert info.value.disposition is Disposition.REQUEUE


#: A qemu-img that records, the moment the real one has returned and before vmbatch's code
#: runs again, the mode of each file it made in the job directory and of the directories
#: from that file up to the job directory (the job directory is 0711 by design).
_SPY = """#!{python}
import json, os, subprocess, sys
rc = subprocess.run(["/usr/bin/qemu-img", *sys.argv[1:]]).returncode
top = {jobdir!r}
with open({log!r}, "a") as log:
    for arg in sys.argv[1:]:
        if arg.startswith(top + "/") and os.path.isfile(arg):
            dirs, d = [], os.path.dirname(arg)
            while True:
                dirs.append(os.stat(d).st_mode)
                if d == top:
                    break
                d = os.path.dirname(d)
            log.write(json.dumps({{"path": arg, "mode": os.stat(arg).st_mode, "dirs": dirs}}))
            log.write("\\n")
sys.exit(rc)
"""


def _exposed(mode: int, dirs: list[int]) -> list[str]:
    """Who besides root could open a file with ``mode`` below directories with ``dirs``."""
    classes = (("group", stat.S_IRGRP, stat.S_IXGRP), ("others", stat.S_IROTH, stat.S_IXOTH))
    return [who for who, r, x in classes if mode & r and all(d & x for d in dirs)]


def test_job_disks_are_never_readable_by_others_not_even_for_an_instant(tmp_path: Path) -> None:
    base = _img(tmp_path / "base.qcow2", "qcow2", "64M")
    jobdir = JobDir(tmp_path / "jobs", "7").create()
    log, spy = tmp_path / "spy.log", tmp_path / "qemu-img-spy"
    spy.write_text(_SPY.format(python=sys.executable, jobdir=str(jobdir.path), log=str(log)))
    spy.chmod(0o755)
    cfg = config.parse(
        {
            "tools": {"qemu_img": str(spy)},
            "disks": {"cvmfs_cache_gib": 1, "scratch_gib": 1},
            "images": {"c": {"source": str(base)}},
        }
    )
    image = resolve(cfg, "c")
    old = os.umask(0o022)  # the prologue's umask (vmbatch.hooks.entry)
    try:
        job_disks(cfg, image, jobdir)
    finally:
        os.umask(old)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    made = [Path(r["path"]).name for r in records]
    assert sorted(made) == ["cvmfs-cache.qcow2", "overlay.qcow2", "scratch.qcow2"]
    for r in records:
        assert _exposed(r["mode"], r["dirs"]) == [], f"{r['path']} mode {r['mode']:o}"
    assert stat.S_IMODE(jobdir.path.stat().st_mode) == 0o711  # still traversable for QEMU


def test_a_qemu_img_that_leaves_a_disk_readable_fails_closed(tmp_path: Path) -> None:
    # A site wrapper that resets permissions: the disk is removed, the job requeued.
    wrapper = tmp_path / "qemu-img-chmod"
    wrapper.write_text(
        '#!/bin/sh\n/usr/bin/qemu-img "$@" || exit\n'
        'for a; do [ -f "$a" ] && chmod 644 "$a"; done\nexit 0\n'
    )
    wrapper.chmod(0o755)
    jobdir = JobDir(tmp_path / "jobs", "8").create()
    cfg = config.parse({"tools": {"qemu_img": str(wrapper)}})
    with pytest.raises(HostError, match="mode 0644, readable by others") as info:
        create_blank(cfg, jobdir.scratch, 1)
    assert info.value.disposition is Disposition.REQUEUE
    assert not jobdir.scratch.exists()
