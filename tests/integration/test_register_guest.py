"""scripts/register-guest: catalog entries for built guests and for stock cloud images, each
checked by loading it as vmbatch's configuration."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vmbatch import config

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "register-guest"
DEBIAN = "https://cloud.debian.org/images/cloud/bookworm/latest/"


def _register(tmp_path: Path, *args: str) -> config.ImageConfig:
    out = subprocess.run(
        [str(SCRIPT), "img", *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    conf = tmp_path / "vmbatch.toml"
    conf.write_text(out)
    return config.load(conf).images["img"]


def _fails(*args: str) -> str:
    proc = subprocess.run(
        [str(SCRIPT), "img", *args], capture_output=True, text=True, check=False, timeout=30
    )
    assert proc.returncode != 0 and proc.stdout == ""
    return proc.stderr


def test_a_guest_made_like_a_cloud_image_is_registered_without_kernel(tmp_path: Path) -> None:
    (tmp_path / "cloud").mkdir()
    (tmp_path / "cloud" / "disk.qcow2").write_bytes(b"\0" * 512)
    img = _register(tmp_path, str(tmp_path / "cloud"), "", "inject")
    assert img.source == str(tmp_path / "cloud" / "disk.qcow2")
    assert (img.kernel, img.initrd, img.cmdline, img.firmware) == (None, None, "", None)
    assert img.context == "inject"
    # A directory with a command line but no kernel is a broken build, not a cloud image.
    (tmp_path / "cloud" / "cmdline").write_text("root=/dev/vda\n")
    assert "has a cmdline file but no vmlinux or vmlinuz" in _fails(str(tmp_path / "cloud"))


def test_a_direct_kernel_guest_keeps_its_kernel(tmp_path: Path) -> None:
    d = tmp_path / "debian"
    d.mkdir()
    for f in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (d / f).write_bytes(b"\0" * 512)
    (d / "cmdline").write_text("root=/dev/vda console=ttyS0\n")
    img = _register(tmp_path, str(d))
    assert (img.kernel, img.initrd, img.cmdline) == (
        d / "vmlinuz",
        d / "initrd.img",
        "root=/dev/vda console=ttyS0",
    )


@pytest.mark.parametrize(
    ("checksum", "expect"),
    [
        (DEBIAN + "SHA512SUMS", {"checksum_url": DEBIAN + "SHA512SUMS"}),
        ("sha256:" + "ab" * 32, {"sha256": "ab" * 32}),
        ("sha512:" + "cd" * 64, {"sha512": "cd" * 64}),
    ],
)
def test_a_stock_image_by_url_and_checksum(
    tmp_path: Path, checksum: str, expect: dict[str, str]
) -> None:
    img = _register(tmp_path, DEBIAN + "debian-12-genericcloud-amd64.qcow2", checksum)
    assert img.source == DEBIAN + "debian-12-genericcloud-amd64.qcow2"
    assert {k: getattr(img, k) for k in expect} == expect
    assert img.kernel is None and img.context == "nocloud"


def test_stock_image_mistakes_are_refused(tmp_path: Path) -> None:
    url = DEBIAN + "debian-12-genericcloud-amd64.qcow2"
    assert "a downloaded image needs a CHECKSUM" in _fails(url)
    assert "CHECKSUM must be sha256:HEX, sha512:HEX or a checksum file URL" in _fails(url, "md5:0")
    local = tmp_path / "stock.qcow2"
    local.write_bytes(b"\0" * 512)
    assert "is used in place, never verified: give it as file://" in _fails(
        str(local), "sha256:" + "ab" * 32
    )
    assert "quotes, backslashes and newlines are not allowed" in _fails(url + '"', "sha256:0")
    assert "no such image file" in _fails(str(tmp_path / "missing.qcow2"))
    img = _register(tmp_path, str(local))  # a local file is used in place, unverified
    assert img.source == str(local) and img.kernel is None
