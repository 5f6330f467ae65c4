"""Per-job copy-on-write disks.

``qemu-img create -f qcow2 -F <fmt> -b <base> <overlay>`` writes only qcow2 metadata, so the
time does not grow with the base image's size, and the guest's writes land in the overlay:
the base image is never written.
"""

from __future__ import annotations

from pathlib import Path

from vmbatch import process
from vmbatch.config import Config
from vmbatch.images.catalog import ImageSpec


def create_overlay(cfg: Config, image: ImageSpec, dest: Path) -> Path:
    """Create ``dest`` as a qcow2 overlay on ``image`` (mode 0600; libvirt re-owns it)."""
    process.run(
        [
            str(cfg.tools.qemu_img),
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            image.format,
            "-b",
            str(image.path),
            str(dest),
        ],
        timeout=cfg.tools.command_timeout,
    )
    dest.chmod(0o600)
    return dest
