#!/usr/bin/env python3
"""Boot-to-SSH benchmark: raw QEMU versus `vmbatch run -- true`, on the same guest.

For each round it measures, on the same kernel, initramfs, accelerator and devices:

- raw: ``qemu-system-x86_64`` started directly (user-mode network with a loopback forward,
  the overlay and a NoCloud seed as virtio disks), from process start to the first
  successful ``ssh true`` with the pinned key;
- vmbatch: ``lifecycle.run_job(... ["true"])`` end to end (overlay, seed, define/create,
  wait-for-SSH, command, teardown), with vmbatch's own time per phase.

It prints the medians and the ratio vmbatch/raw, both for "until the command has run"
(comparable to raw) and end to end including teardown. Figures only: nothing is asserted.

usage: bench/boot.py [--guest /var/cache/vmbatch/guests/tiny] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from vmbatch import accel, config, lifecycle
from vmbatch.contextualize import ContextSpec
from vmbatch.contextualize.keys import generate
from vmbatch.contextualize.nocloud import build_iso, meta_data, user_data
from vmbatch.errors import GuestConnectionError
from vmbatch.guest import ssh
from vmbatch.images.catalog import resolve
from vmbatch.images.disks import create_overlay
from vmbatch.job import interactive

WORK = Path("/var/lib/vmbatch/bench")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_boot(cfg: config.Config, guest: Path, domain_type: str) -> float:
    """Seconds from starting QEMU directly to the first successful `ssh true`."""
    img = cfg.images["demo"]
    work = Path(tempfile.mkdtemp(dir=WORK))
    try:
        overlay = create_overlay(cfg, resolve(cfg, "demo"), work / "overlay.qcow2")
        client, host = generate("bench"), generate("bench-host")
        spec = ContextSpec("bench", "bench", None, (client.public_openssh,), host)
        seed = work / "seed.iso"
        seed.write_bytes(
            build_iso(
                {"user-data": user_data(spec).encode(), "meta-data": meta_data(spec).encode()}
            )
        )
        port = free_port()
        accel_arg = "kvm" if domain_type == "kvm" else "tcg"
        cpu = "host" if domain_type == "kvm" else "max"
        argv = [
            str(cfg.tools.qemu_system),
            "-accel",
            accel_arg,
            "-machine",
            cfg.vm.machine,
            "-cpu",
            cpu,
            "-m",
            str(img.memory or 256),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            f"file:{work / 'console.log'}",
            "-kernel",
            str(img.kernel),
            "-initrd",
            str(img.initrd),
            "-append",
            img.cmdline,
            "-drive",
            f"file={overlay},if=virtio,format=qcow2",
            "-drive",
            f"file={seed},if=virtio,format=raw,readonly=on",
            "-netdev",
            f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
            "-device",
            "virtio-rng-pci",
        ]
        if img.firmware:
            argv += ["-bios", str(img.firmware)]
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        try:
            ep = ssh.Endpoint(port=port, user="root", client_key=client, host_key=host)
            client_conn = ssh.wait_for_ssh(
                ep, 120, lambda: proc.poll() is None, lambda: "(raw QEMU)"
            )
            status = ssh.run(client_conn, ["true"], io.BytesIO(), io.BytesIO())
            elapsed = time.monotonic() - start
            client_conn.close()
            if status != 0:
                raise GuestConnectionError(f"raw: `true` returned {status}")
            return elapsed
        finally:
            proc.kill()
            proc.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def vmbatch_run(cfg: config.Config) -> tuple[float, dict[str, float]]:
    timings: dict[str, float] = {}
    start = time.monotonic()
    status = lifecycle.run_job(
        cfg, interactive("demo", ("true",)), io.BytesIO(), io.BytesIO(), timings=timings
    )
    total = time.monotonic() - start
    if status != 0:
        raise GuestConnectionError(f"vmbatch: `true` returned {status}")
    return total, timings


def tiny_config(guest: Path) -> config.Config:
    """A configuration with a built guest (tiny or debian) as image "demo", files in WORK."""
    WORK.mkdir(parents=True, exist_ok=True)
    WORK.chmod(0o755)
    tiny = (guest / "vmlinux").is_file()
    image = {
        "source": str(guest / "disk.qcow2"),
        "format": "qcow2",
        "kernel": str(guest / ("vmlinux" if tiny else "vmlinuz")),
        "initrd": str(guest / ("initrd.cpio" if tiny else "initrd.img")),
        "cmdline": (guest / "cmdline").read_text().strip(),
    }
    if tiny:
        image |= {"firmware": "/usr/share/qemu/qboot.rom", "memory": 256}
    return config.parse(
        {
            "paths": {"job_dir": str(WORK / "jobs"), "cache_dir": str(WORK / "cache")},
            "vm": {"outbound_network": False, "boot_timeout": 600},
            "images": {"demo": image},
        }
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guest", type=Path, default=Path("/var/cache/vmbatch/guests/tiny"))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    guest = args.guest.resolve()
    cfg = tiny_config(guest)
    choice = accel.choose(cfg)
    print(f"guest {guest}; accelerator {choice.accel} ({choice.reason}); {args.rounds} rounds")
    raw: list[float] = []
    total: list[float] = []
    phases: dict[str, list[float]] = {p: [] for p in lifecycle.PHASES}
    vmbatch_run(cfg)  # warm-up: page cache, libvirt capabilities
    for i in range(args.rounds):
        raw.append(raw_boot(cfg, guest, choice.domain_type))
        t, ph = vmbatch_run(cfg)
        total.append(t)
        for p in lifecycle.PHASES:
            phases[p].append(ph.get(p, 0.0))
        print(
            f"  round {i + 1}: raw {raw[-1]:.2f}s  vmbatch {t:.2f}s  "
            + " ".join(f"{p}={ph.get(p, 0):.2f}" for p in lifecycle.PHASES),
            flush=True,
        )
    med = statistics.median
    until_cmd = [
        sum(phases[p][i] for p in lifecycle.PHASES if p != "teardown") for i in range(args.rounds)
    ]
    print("\nmedians (seconds)")
    print(f"  raw qemu boot-to-ssh-true      {med(raw):6.2f}")
    print(
        f"  vmbatch until command done     {med(until_cmd):6.2f}"
        f"   ratio {med(until_cmd) / med(raw):.3f}"
    )
    print(f"  vmbatch end to end (teardown)  {med(total):6.2f}   ratio {med(total) / med(raw):.3f}")
    for p in lifecycle.PHASES:
        print(f"    {p:10} {med(phases[p]):6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
