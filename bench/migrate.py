#!/usr/bin/env python3
"""Live-migration benchmark: downtime and total time of vmbatch.migrate.migrate.

Two test-owned libvirtds on this machine, each in its own network and mount namespace
(tests/system/libvirt_pair.py), one tiny-guest VM built from vmbatch's own domain XML
(256 MiB, counting on its console). The VM is migrated back and forth ``--rounds`` times,
first idle, then (``--busy-mib``) with a guest loop copying that many MiB of random
data within tmpfs over and over, so memory is dirtied while it moves. Memory and disk
streams go over Unix sockets (no network). For each case it prints libvirt's figures
(``virDomainGetJobStats`` on the destination: ``downtime``, ``time_elapsed``,
``memory_processed``) and the wall time of the whole call (preparation, disk top-layer
creation, port forward and statistics included): median, min, max. Figures only: nothing
is asserted.

Run as root after ``make test``'s set-up (the tiny guest built)::

    .venv/bin/python bench/migrate.py --rounds 6
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.system.libvirt_pair import (  # noqa: E402
    LibvirtPair,
    guest_ssh,
    start_counter_vm,
    wait_console,
)
from vmbatch import migrate  # noqa: E402
from vmbatch.config import Config, LibvirtConfig  # noqa: E402
from vmbatch.libvirt.connection import Connection  # noqa: E402

WORK = Path("/var/lib/vmbatch/bench")


def _row(label: str, values: list[float], unit: str) -> str:
    return (
        f"{label:<28} median {statistics.median(values):8.1f} {unit}"
        f"   min {min(values):8.1f}   max {max(values):8.1f}   (n={len(values)})"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guest", type=Path, default=Path("/var/cache/vmbatch/guests/tiny"))
    ap.add_argument("--rounds", type=int, default=6, help="migrations per case")
    ap.add_argument("--busy-mib", type=int, default=64, help="MiB the busy guest rewrites")
    args = ap.parse_args()
    cfg = Config()
    WORK.mkdir(parents=True, exist_ok=True)
    WORK.chmod(0o755)
    base = WORK / f"migrate-{uuid.uuid4().hex[:8]}"
    try:
        with LibvirtPair(base) as pair:
            sides = [
                (Connection(LibvirtConfig(uri=d.uri)).open(), d.uri, ns)
                for d, ns in zip((pair.src, pair.dst), pair.netns, strict=True)
            ]
            try:
                vm = start_counter_vm(sides[0][0], args.guest.resolve(), base / "job-0")
                wait_console(vm.job_dir / "console.log", b"vmbatch-tiny: ssh ready")
                here, n = 0, 0
                port = sides[0][0].forward_port(vm.name, cfg.ssh.port)
                for case in ("idle", "busy"):
                    if case == "busy":
                        guest_ssh(
                            sides[here][2],
                            vm,
                            port,
                            # Not zeros: QEMU sends a zero page as a flag, not 4 KiB.
                            f"dd if=/dev/urandom of=/dev/shm/src bs=1M count={args.busy_mib}"
                            " 2>/dev/null; while :; do cp /dev/shm/src /dev/shm/dirty;"
                            " done >/dev/null 2>&1 &",
                        )
                    downtime, total, call, sent = [], [], [], []
                    for _ in range(args.rounds):
                        n += 1
                        there = 1 - here
                        r = migrate.migrate(
                            cfg,
                            sides[here][0],
                            vm.name,
                            sides[there][1],
                            base / f"job-{n}",
                            uri=f"unix://{pair.sockets}/memory-{n}.sock",
                            disks_uri=f"unix://{pair.sockets}/disks-{n}.sock",
                        )
                        downtime.append(float(r.downtime_ms or 0))
                        total.append(float(r.total_ms or 0))
                        call.append(r.elapsed_s * 1000)
                        sent.append((r.memory_transferred or 0) / 2**20)
                        here, port = there, r.ssh_port
                    print(f"-- {case} guest (256 MiB, tiny guest, TCG), {args.rounds} migrations")
                    print(_row("downtime (libvirt)", downtime, "ms"))
                    print(_row("migration total (libvirt)", total, "ms"))
                    print(_row("migrate() call (wall)", call, "ms"))
                    print(_row("memory sent", sent, "MiB"))
            finally:
                for conn, _, _ in sides:
                    conn.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
