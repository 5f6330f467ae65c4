#!/usr/bin/env python3
"""Boot time of a disk-booted cloud image next to the direct-kernel guests.

Runs ``vmbatch run -- true`` (``lifecycle.run_job``, NoCloud seed, vmbatch's own phase
timer) in turns on:

- tiny:   direct kernel boot (vmlinux + busybox initramfs, qboot), no cloud-init;
- debian: direct kernel boot of the Debian guest (vmlinuz + initramfs from the guest
          directory, vmbatch's tuned command line), its trimmed cloud-init;
- cloud:  the guest made like a stock cloud image: SeaBIOS -> GRUB in the image ->
          the image's kernel and initramfs with the image's own command line, Debian's
          stock cloud-init.

It prints each round and the medians of "wait_ssh" (created domain to SSH login) and of
the whole run. Figures only: nothing is asserted. Under TCG on this machine the cloud
image's extra time is firmware + GRUB, an unstripped initramfs and stock cloud-init.

usage: bench/cloud_boot.py [--guests /var/cache/vmbatch/guests] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmbatch import accel, config, lifecycle  # noqa: E402
from vmbatch.job import interactive  # noqa: E402

WORK = Path("/var/lib/vmbatch/bench")


def images(guests: Path) -> dict[str, dict[str, Any]]:
    tiny, debian, cloud = guests / "tiny", guests / "debian", guests / "cloud"
    return {
        "tiny": {
            "source": str(tiny / "disk.qcow2"),
            "kernel": str(tiny / "vmlinux"),
            "initrd": str(tiny / "initrd.cpio"),
            "cmdline": (tiny / "cmdline").read_text().strip(),
            "firmware": "/usr/share/qemu/qboot.rom",
            "memory": 256,
        },
        "debian": {
            "source": str(debian / "disk.qcow2"),
            "kernel": str(debian / "vmlinuz"),
            "initrd": str(debian / "initrd.img"),
            "cmdline": (debian / "cmdline").read_text().strip(),
        },
        "cloud": {"source": str(cloud / "disk.qcow2")},  # no kernel: its own bootloader
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=Path, default=Path("/var/cache/vmbatch/guests"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    guests = args.guests.resolve()
    for name in ("tiny", "debian", "cloud"):
        if not (guests / name / "disk.qcow2").is_file():
            print(f"{guests / name} missing: run `make guest-{name}`", file=sys.stderr)
            return 1
    WORK.mkdir(parents=True, exist_ok=True)
    WORK.chmod(0o755)
    cfg = config.parse(
        {
            "paths": {"job_dir": str(WORK / "jobs"), "cache_dir": str(WORK / "cache")},
            "vm": {"outbound_network": False, "boot_timeout": 600},
            "images": images(guests),
        }
    )
    choice = accel.choose(cfg)
    print(f"guests {guests}; accelerator {choice.accel} ({choice.reason}); {args.rounds} rounds")
    wait: dict[str, list[float]] = {n: [] for n in cfg.images}
    total: dict[str, list[float]] = {n: [] for n in cfg.images}
    for i in range(args.rounds):
        for name in cfg.images:
            timings: dict[str, float] = {}
            start = time.monotonic()
            status = lifecycle.run_job(
                cfg, interactive(name, ("true",)), io.BytesIO(), io.BytesIO(), timings=timings
            )
            if status != 0:
                print(f"{name}: `true` returned {status}", file=sys.stderr)
                return 1
            total[name].append(time.monotonic() - start)
            wait[name].append(timings.get("wait_ssh", 0.0))
            print(
                f"  round {i + 1} {name:7} created->ssh {wait[name][-1]:6.2f}s"
                f"  end to end {total[name][-1]:6.2f}s",
                flush=True,
            )
    med = statistics.median
    print("\nmedians (seconds)        created->ssh   end to end")
    labels = {
        "tiny": "tiny   (direct kernel)",
        "debian": "debian (direct kernel)",
        "cloud": "cloud  (own bootloader)",
    }
    for name in cfg.images:
        print(f"  {labels[name]:24} {med(wait[name]):10.2f} {med(total[name]):12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
