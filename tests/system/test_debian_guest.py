"""The Debian bookworm guest with the real cloud-init: our NoCloud seed, for real.

One boot (about a minute under TCG): cloud-init must install the per-job authorized key and
the pinned Ed25519 host key from the seed, and set the hostname.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.system.conftest import Site, built_guest, register


@pytest.fixture(scope="module")
def debian_dir() -> Path:
    return built_guest("debian")


def test_cloud_init_guest_takes_keys_and_hostname_from_the_seed(
    site: Site, debian_dir: Path
) -> None:
    site.write(register("debian", debian_dir))
    res = site.vmbatch(
        "run",
        "--image",
        "debian",
        "--",
        "sh",
        "-c",
        "hostname; id -u; cloud-init status --wait | tail -n 1",
    )
    out = res.stdout.decode().split()
    assert res.returncode == 0, res.stderr.decode()
    assert out[0].startswith("vmbatch-run-")
    assert out[1:] == ["0", "status:", "done"]  # cloud-init finished without errors
    [console] = site.console_dir.glob("*.log")
    log = console.read_text(errors="replace")
    assert "Datasource DataSourceNoCloud" in log
    assert "Invalid cloud-config" not in log  # our user-data passes cloud-init's schema
