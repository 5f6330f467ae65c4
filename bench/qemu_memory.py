#!/usr/bin/env python3
"""QEMU's memory beyond the guest's: what [limits].qemu_overhead_mib / _per_gib rest on.

For each guest size (and TCG translation-block cache size) one VM is booted through
``lifecycle.booted`` with no memory limit; then, measured from the host:

- ``boot``: after the guest answers SSH;
- ``touched``: after the guest has written almost all of its RAM (``dd`` with a buffer of
  MemAvailable less 24 MiB: the pages stay resident in QEMU after dd exits, there is no
  balloon) and run many programs (each ``/usr/bin`` and ``/usr/sbin`` binary's ``--version``
  for up to 40 s, which fills the translation cache with new code).

QEMU's ``/proc/PID/smaps`` is split into the guest's RAM (the anonymous mapping of the
guest's size), the translation-block cache (the anonymous ``rwx`` mapping; TCG only) and
the rest; the rest is QEMU's own overhead. Its memory cgroup (libvirt's, cgroup v1 here)
adds what RSS does not show: page tables and other kernel memory charged to it
(``memory.kmem.usage_in_bytes``) and the page cache of the files it reads
(``memory.stat`` ``cache``, reclaimable). Figures only; docs/design.md cites them.

usage: bench/qemu_memory.py [--guest DIR] [--memory 256 512 1024] [--tb-cache 0 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot import tiny_config

from vmbatch import accel, lifecycle, reaper
from vmbatch.config import Config
from vmbatch.guest import ssh
from vmbatch.job import interactive

MiB = 1 << 20


@dataclasses.dataclass
class Split:
    rss: float
    guest: float
    tb: float
    kmem: float
    cache: float

    @property
    def own(self) -> float:
        return self.rss - self.guest - self.tb

    def row(self, label: str) -> str:
        return (
            f"{label:8} rss {self.rss:7.1f}  guest {self.guest:7.1f}  tb {self.tb:6.1f}"
            f"  qemu-own {self.own:6.1f}  kmem {self.kmem:5.1f}  cache {self.cache:6.1f}"
        )


def split(pid: int, guest_mib: int) -> Split:
    """RSS of the guest's RAM, the TB cache and the rest (MiB), and cgroup extras."""
    maps: list[tuple[int, str, str, int]] = []  # size, perms, name, rss (KiB)
    size = rss = 0
    perms = name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            if perms:
                maps.append((size, perms, name, rss))
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            size, perms, name, rss = (hi - lo) // 1024, head[1], " ".join(head[5:]), 0
        elif head[0] == "Rss:":
            rss = int(head[1])
    maps.append((size, perms, name, rss))
    total = sum(m[3] for m in maps) / 1024
    anon = [m for m in maps if not m[2]]
    ram = max(
        (m for m in anon if guest_mib * 1024 <= m[0] <= (guest_mib + 4) * 1024),
        key=lambda m: m[0],
        default=None,
    )
    tb = sum(m[3] for m in anon if "x" in m[1] and "w" in m[1]) / 1024
    kmem = cache = 0.0
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctl, path = line.split(":", 2)
        if "memory" in ctl.split(","):
            cg = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            kmem = int((cg / "memory.kmem.usage_in_bytes").read_text()) / MiB
            for stat in (cg / "memory.stat").read_text().splitlines():
                key, value = stat.split()
                if key == "cache":
                    cache = int(value) / MiB
    return Split(total, (ram[3] if ram else 0) / 1024, tb, kmem, cache)


def run(guest: lifecycle.Guest, command: str) -> str:
    out, err = io.BytesIO(), io.BytesIO()
    ssh.run(guest.client, ("sh", "-c", command), out, err)
    return out.getvalue().decode(errors="replace")


TOUCH = (
    "avail=$(awk '/MemAvailable/ {print $2}' /proc/meminfo);"
    " dd if=/dev/zero of=/dev/null bs=$(( (avail - 24576) / 1024 ))M count=1 2>/dev/null;"
    " echo $avail"
)
CODE = (
    "end=$(( $(date +%s) + 40 )); for b in /usr/bin/* /usr/sbin/*; do"
    ' [ "$(date +%s)" -lt "$end" ] || break; timeout 2 "$b" --version </dev/null'
    " >/dev/null 2>&1; done; true"
)


def measure(cfg: Config, memory: int, tb_cache: int) -> None:
    cfg = dataclasses.replace(
        cfg,
        vm=dataclasses.replace(cfg.vm, tcg_tb_cache_mib=tb_cache),
        limits=dataclasses.replace(cfg.limits, memory_limit=False),
    )
    job = interactive("demo", ("true",), memory=memory)
    t0 = time.monotonic()
    with lifecycle.booted(cfg, job) as guest:
        boot = time.monotonic() - t0
        (qemu,) = [
            q for q in reaper.find_qemus(cfg.paths.job_dir, cfg.tools.qemu_system)
            if q.name == guest.name
        ]  # fmt: skip
        print(f"guest {memory} MiB, tb-cache {tb_cache or 'default'}: SSH after {boot:.1f} s")
        print("  " + split(qemu.pid, memory).row("boot"))
        avail = run(guest, TOUCH).strip()
        run(guest, CODE)
        print("  " + split(qemu.pid, memory).row("touched") + f"  (guest avail {avail} KiB)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guest", type=Path, default=Path("/var/cache/vmbatch/guests/tiny"))
    ap.add_argument("--memory", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--tb-cache", type=int, nargs="+", default=[0, 128])
    args = ap.parse_args()
    cfg = tiny_config(args.guest.resolve())
    choice = accel.choose(cfg)
    print(f"guest {args.guest.resolve()}; accelerator {choice.accel}; sizes in MiB")
    for tb in args.tb_cache:
        for memory in args.memory:
            measure(cfg, memory, tb)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
