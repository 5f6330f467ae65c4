"""`vmbatch run` failures that need real tools but no daemon: one line, right code, no leftovers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vmbatch import cli


def _site(tmp_path: Path, extra: str) -> tuple[Path, Path]:
    base = tmp_path / "base.qcow2"
    subprocess.run(
        ["/usr/bin/qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True
    )
    jobs = tmp_path / "jobs"
    conf = tmp_path / "vmbatch.toml"
    conf.write_text(
        f'[paths]\njob_dir = "{jobs}"\n[vm]\naccel = "tcg"\n'
        f'[images.demo]\nsource = "{base}"\n{extra}'
    )
    return conf, jobs


def test_libvirtd_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf, jobs = _site(
        tmp_path, "[libvirt]\nuri = 'qemu+unix:///system?socket=/nonexistent'\ntimeout = 5\n"
    )
    assert cli.main(["-c", str(conf), "run", "--image", "demo", "--", "true"]) == 75
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vmbatch: error: libvirt could not connect")
    assert "is libvirtd running?" in err[0]
    assert jobs.is_dir() and not any(jobs.iterdir())  # the job directory was removed


def test_non_image_is_refused_before_anything_is_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"#!/bin/sh\necho not a disk\n")
    conf, jobs = _site(tmp_path, f'[images.junk]\nsource = "{junk}"\n')
    assert cli.main(["-c", str(conf), "run", "--image", "junk", "--", "true"]) == 65
    err = capsys.readouterr().err
    assert "image 'junk'" in err and "does not look like a disk image" in err
    assert not jobs.exists()
