"""conf/examples/cloud-images.toml: the stock cloud image entries a site copies. Checked
offline with `vmbatch config check` as the file says; nothing is fetched."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from vmbatch import cli, config
from vmbatch.images.checksums import file_name

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "conf" / "examples" / "cloud-images.toml"


def test_vmbatch_config_check_passes_on_the_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "check", str(EXAMPLES)]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("4 image(s): alma9, cernvm4, debian12, rocky9")


def test_each_example_is_a_stock_image_verified_by_its_published_checksum_file() -> None:
    images = config.load(EXAMPLES).images
    hosts = {name: urlsplit(img.source).hostname for name, img in images.items()}
    assert hosts == {
        "debian12": "cloud.debian.org",
        "alma9": "repo.almalinux.org",
        "rocky9": "dl.rockylinux.org",
        "cernvm4": "cernvm.cern.ch",
    }
    sums = {name: file_name(img.checksum_url or "") for name, img in images.items()}
    assert sums == {
        "debian12": "SHA512SUMS",
        "alma9": "CHECKSUM",
        "rocky9": "CHECKSUM",
        "cernvm4": file_name(images["cernvm4"].source) + ".sha256",
    }
    for name, img in images.items():
        assert img.source.startswith("https://") and (img.checksum_url or "").startswith(
            "https://"
        ), name
        # The checksum file sits beside the image, as the distributions publish them.
        assert img.source.rpartition("/")[0] == (img.checksum_url or "").rpartition("/")[0]
        assert (img.kernel, img.initrd, img.cmdline) == (None, None, ""), name  # own bootloader
        assert img.sha256 is None and img.sha512 is None and img.verify
    assert images["cernvm4"].context == "cernvm" and images["cernvm4"].cvmfs_cache_gib


def test_the_examples_are_not_loaded_by_default() -> None:
    shipped = config.load(ROOT / "conf" / "vmbatch.toml")
    assert dict(shipped.images) == {}
    assert EXAMPLES.parent.name == "examples"  # not a vmbatch.d drop-in directory
