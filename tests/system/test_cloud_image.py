"""Stock cloud images: a guest made like one (guests/cloud/build.sh: GPT disk, GRUB inside,
kernel only inside, Debian's stock cloud-init) boots from its own disk through its own
bootloader and runs a job, once per contextualization method that applies:

- ``nocloud``: from an http:// source on 127.0.0.1 with only a checksum file beside it
  (``checksum_url``, a Debian-style SHA512SUMS), fetched into the node cache, as a site
  adds a distribution's image;
- ``cernvm``: the CernVM/HEPiX context CD plus the NoCloud volume, which the image's
  cloud-init reads;
- ``inject``: written by libguestfs into the overlay's root partition (partition 2 of a
  GPT disk); no seed, so the image's cloud-init finds no datasource and stays off, and the
  image's DHCP fallback brings the network up (as NetworkManager does in EL images).

Under TCG (this machine's KVM hangs guests). Each boot takes about one to two minutes; the
three run at the same time.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.system.conftest import Site, built_guest, register, together
from tests.system.test_debian_guest import IDENTITY_SCRIPT, USER, _assert_identity
from vmbatch import config, lifecycle
from vmbatch.job import interactive
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import domain_name
from vmbatch.state import safe_job_id

#: First how the image's cloud-init ended (waiting for it: a job may start before its last
#: stages ran), then the identity lines, then how the kernel was started and what it runs on.
SCRIPT = (
    "cloud-init status --wait 2>/dev/null | tail -n 1;"
    + IDENTITY_SCRIPT
    + " cat /proc/cmdline; findmnt -n -o SOURCE,FSTYPE /; ls /boot | grep -c '^vmlinuz-';"
)
UPSTREAM_NAME = "debian-12-genericcloud-amd64.qcow2"


@pytest.fixture(scope="module")
def cloud_dir() -> Path:
    return built_guest("cloud")


class RecordingConnection(Connection):
    """The real connection, keeping the domain XML vmbatch hands to libvirt, by name."""

    xml: dict[str, str]

    def create(self, name: str, xml: str, *, memory_limit_mib: int | None = None) -> None:
        self.xml[name] = xml
        super().create(name, xml, memory_limit_mib=memory_limit_mib)


@pytest.fixture
def recorder(libvirt_conn: Connection) -> Iterator[RecordingConnection]:
    conn = RecordingConnection(config.LibvirtConfig())
    conn.xml = {}
    conn.open()
    try:
        yield conn
    finally:
        conn.close()


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def mirror(site: Site, cloud_dir: Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 publishing the guest's disk as a distribution publishes
    its cloud image: under its upstream name, with a SHA512SUMS listing it and another file."""
    root = site.root / "mirror"
    root.mkdir()
    disk = cloud_dir / "disk.qcow2"
    (root / UPSTREAM_NAME).symlink_to(disk)
    h = hashlib.sha512()
    with disk.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    (root / "SHA512SUMS").write_text(
        f"{hashlib.sha512(b'other').hexdigest()}  debian-12-generic-amd64.qcow2\n"
        f"{h.hexdigest()}  {UPSTREAM_NAME}\n"
    )
    handler = functools.partial(_QuietFiles, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _run(site: Site, image: str, conn: RecordingConnection) -> tuple[list[str], str, str]:
    """Run SCRIPT as the test user on ``image``; its lines (after the identity is checked),
    its console and its domain XML."""
    job = interactive(image, ("sh", "-c", SCRIPT), identity=USER)
    out, err = io.BytesIO(), io.BytesIO()
    status = lifecycle.run_job(config.load(site.config), job, out, err, conn=conn)
    assert status == 0, f"{image}: {err.getvalue().decode()}"
    lines = out.getvalue().decode().splitlines()
    _assert_identity(job, lines[1:])
    console = (site.console_dir / f"{safe_job_id(job.job_id)}.log").read_text(errors="replace")
    return lines, console, conn.xml[domain_name(job.job_id)]


def _assert_own_bootloader(lines: list[str], console: str, domain: str) -> None:
    """GRUB in the image loaded the image's kernel from its root partition."""
    assert "<kernel>" not in domain and "<initrd>" not in domain and "<cmdline>" not in domain
    assert '<boot order="1" />' in domain
    cmdline, root, kernels = lines[5:8]
    assert cmdline.startswith("BOOT_IMAGE=/boot/vmlinuz-")  # GRUB's linux command sets it
    assert "root=UUID=" in cmdline and "console=ttyS0,115200" in cmdline
    assert root.split() == ["/dev/vda2", "ext4"]  # partition 2 of the GPT disk
    assert kernels == "1"
    assert "Loading Linux" in console  # GRUB's menu entry, on the serial console


def test_a_stock_image_boots_its_own_bootloader_with_each_context_method(
    site: Site, mirror: str, cloud_dir: Path, recorder: RecordingConnection
) -> None:
    """The three boots are independent behaviours; they run at the same time (together)
    because each takes a minute or more under TCG."""
    site.write(
        f'\n[images.stock]\nsource = "{mirror}/{UPSTREAM_NAME}"\n'
        f'checksum_url = "{mirror}/SHA512SUMS"\n'
        + register("cloud-cernvm", cloud_dir, context="cernvm")
        + register("cloud-inject", cloud_dir, context="inject")
    )
    before = (cloud_dir / "disk.qcow2").stat().st_mtime_ns
    stock, cernvm, inject = together(
        *(functools.partial(_run, site, image, recorder)
          for image in ("stock", "cloud-cernvm", "cloud-inject"))
    )  # fmt: skip

    # nocloud, from the URL: the image's stock cloud-init finished cleanly.
    lines, console, domain = stock
    assert lines[0] == "status: done" and "DataSourceNoCloud" in console
    _assert_own_bootloader(lines, console, domain)
    # Fetched once into the node cache, verified by the checksum file's line.
    [cached] = (site.root / "cache" / "images").glob("stock-*.img")
    meta = (cached.with_name(cached.name + ".meta")).read_text()
    assert '"algorithm": "sha512"' in meta
    assert os.stat(cached).st_size == os.stat(site.root / "mirror" / UPSTREAM_NAME).st_size

    # cernvm: the context CD and the NoCloud volume, read by the image's cloud-init.
    lines, console, domain = cernvm
    assert lines[0] == "status: done" and "DataSourceNoCloud" in console
    _assert_own_bootloader(lines, console, domain)

    # inject: nothing to read, so ds-identify left cloud-init off; the job ran all the same.
    lines, console, domain = inject
    assert lines[0] == "status: disabled"
    _assert_own_bootloader(lines, console, domain)

    assert (cloud_dir / "disk.qcow2").stat().st_mtime_ns == before  # the base is untouched
