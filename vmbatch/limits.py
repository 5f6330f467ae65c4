"""Holding a job's VM to its allocation: host CPUs, QEMU's memory, QEMU's usage.

- CPU lists in the kernel's notation (``0-3,8``; cpuset(7) "List format"), as cgroup
  ``cpuset.cpus`` files, ``/proc/PID/status`` ``Cpus_allowed_list`` and libvirt's
  ``cpuset`` attributes write them.
- Slurm's abstract CPU ids (``scontrol show job -d`` ``CPU_IDs=``) number a node's CPUs
  socket by socket, core by core, thread by thread; the OS numbers them as the firmware
  enumerated them (on most two-socket and SMT machines: alternating sockets, all first
  threads before all second threads). :func:`slurm_to_os` maps one to the other as slurmd
  does for its task plugins (``xcpuinfo_hwloc_topo_load`` in
  src/slurmd/common/xcpuinfo.c of Slurm 22.05: abstract id = core index x threads per
  core + thread index, with sockets, cores and threads in hwloc's logical order, which
  is that of their lowest OS CPU number), from the topology the kernel reports in
  ``/sys/devices/system/cpu/cpuN/topology`` (``physical_package_id``, ``core_id``).
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmbatch.config import Config

_CPU_LIST = re.compile(r"[0-9]+(?:-[0-9]+)?(?:,[0-9]+(?:-[0-9]+)?)*")
#: No node has more CPUs than this; a larger number is a parse error, not a pin target.
MAX_CPUS = 1 << 16


def cpu_list(cpus: tuple[int, ...] | frozenset[int]) -> str:
    """Host CPU numbers as a CPU list: ``(0, 1, 2, 5)`` -> ``"0-2,5"``."""
    if not cpus or min(cpus) < 0:
        raise ValueError(f"not a set of CPU numbers: {sorted(cpus)}")
    ranges: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def parse_cpu_list(text: str) -> frozenset[int]:
    """``"0-2,5"`` -> ``{0, 1, 2, 5}``; ValueError unless it is a non-empty CPU list."""
    text = text.strip()
    if not _CPU_LIST.fullmatch(text):
        raise ValueError(f"not a CPU list: {text[:80]!r}")
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        lo, hi = int(first), int(last or first)
        if hi < lo or hi >= MAX_CPUS:
            raise ValueError(f"not a CPU range: {part!r}")
        cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


SYSFS_CPU = Path("/sys/devices/system/cpu")


@dataclass(frozen=True, slots=True)
class HostCpu:
    """One online CPU: its OS number and where it sits."""

    os_id: int
    package: int
    core: int
    die: int = 0


def host_cpus(sysfs: Path = SYSFS_CPU) -> tuple[HostCpu, ...]:
    """The online CPUs and their topology (sysfs-devices-system-cpu(5) ABI)."""
    online = parse_cpu_list((sysfs / "online").read_text())
    found = []
    for cpu in sorted(online):
        topo = sysfs / f"cpu{cpu}" / "topology"
        package = int((topo / "physical_package_id").read_text())
        core = int((topo / "core_id").read_text())
        die = topo / "die_id"  # Linux 5.2+: core_id is unique within a die
        found.append(HostCpu(cpu, package, core, int(die.read_text()) if die.exists() else 0))
    return tuple(found)


def slurm_order(cpus: tuple[HostCpu, ...]) -> tuple[int, ...]:
    """OS CPU numbers in Slurm's abstract order (the index is the abstract id), or ``()``
    if the cores do not all have the same number of threads (slurmd's numbering then
    leaves gaps that this does not reproduce)."""
    cores: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for cpu in cpus:
        cores[(cpu.package, cpu.die, cpu.core)].append(cpu.os_id)
    if len({len(threads) for threads in cores.values()}) > 1:
        return ()
    first_of_package: dict[int, int] = {}
    for (package, _, _), threads in cores.items():
        first_of_package[package] = min(first_of_package.get(package, min(threads)), *threads)
    order = sorted(cores, key=lambda key: (first_of_package[key[0]], min(cores[key])))
    return tuple(cpu for key in order for cpu in sorted(cores[key]))


def slurm_to_os(ids: frozenset[int], cpus: tuple[HostCpu, ...]) -> frozenset[int] | None:
    """Slurm's abstract CPU ids as OS CPU numbers; None if some id is not one of this
    host's (slurm.conf describes the node otherwise than ``slurmd -C``) or the topology is
    irregular."""
    order = slurm_order(cpus)
    if not order or max(ids) >= len(order):
        return None
    return frozenset(order[i] for i in ids)


# -- QEMU's memory ---------------------------------------------------------------------

#: QEMU's TCG translation-block cache when ``tb-size`` is not given: 1 GiB on 64-bit hosts
#: since QEMU 5.0 (commit 600e17b2, "accel/tcg: increase default code gen buffer size for
#: 64 bit"; libvirt issue #229).
QEMU_DEFAULT_TB_CACHE_MIB = 1024
#: QEMU's bookkeeping of translated code outside the cache (its translation-block hash
#: table, per-page descriptors), per MiB of cache: 0.18 measured with the Debian guest
#: (bench/qemu_memory.py, docs/design.md "QEMU's memory"), counted as 0.2.
TB_METADATA = 0.2


def qemu_overhead_mib(cfg: Config, guest_mib: int, domain_type: str) -> int:
    """QEMU's own memory beyond a guest of ``guest_mib``: ``[limits].qemu_overhead_mib`` +
    ``qemu_overhead_per_gib`` per GiB of guest RAM + under TCG the whole translation-block
    cache (``[vm].tcg_tb_cache_mib``; a long job fills it) and its bookkeeping
    (:data:`TB_METADATA`); rounded up."""
    lim = cfg.limits
    tb = 0
    if domain_type == "qemu":
        size = cfg.vm.tcg_tb_cache_mib or QEMU_DEFAULT_TB_CACHE_MIB
        tb = math.ceil(size * (1 + TB_METADATA))
    return lim.qemu_overhead_mib + math.ceil(lim.qemu_overhead_per_gib * guest_mib / 1024) + tb


def hard_limit_mib(cfg: Config, guest_mib: int, domain_type: str) -> int:
    """The memory a VM with ``guest_mib`` of RAM may use on the host: guest plus QEMU."""
    return guest_mib + qemu_overhead_mib(cfg, guest_mib, domain_type)


# -- QEMU's usage ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QemuUsage:
    """What one QEMU process used so far: CPU seconds (user + system, all its threads)
    and its peak resident set in MiB."""

    cpu_seconds: float
    peak_rss_mib: int


def qemu_usage(pid: int, proc: Path = Path("/proc")) -> QemuUsage | None:
    """A process's usage from ``/proc/PID/stat`` (fields 14-15, ``utime``/``stime`` in
    clock ticks, every thread included) and ``/proc/PID/status`` (``VmHWM``, peak RSS);
    proc(5). None if the process is gone."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        status = (proc / str(pid) / "status").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # comm may hold anything: count from ")"
    ticks = int(fields[11]) + int(fields[12])
    hwm = re.search(r"^VmHWM:\s+([0-9]+) kB", status, re.M)
    return QemuUsage(round(ticks / os.sysconf("SC_CLK_TCK"), 2), int(hwm[1]) // 1024 if hwm else 0)


def memory_cgroup_present(mounts: Path = Path("/proc/self/mounts")) -> bool:
    """Whether the kernel's memory controller is mounted, which libvirt needs to hold a
    VM to a hard limit: a cgroup v1 hierarchy with ``memory``, or a cgroup v2 one that
    offers it (``cgroup.controllers``)."""
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        if fields[2] == "cgroup" and "memory" in fields[3].split(","):
            return True
        if fields[2] == "cgroup2":
            try:
                offered = (Path(fields[1]) / "cgroup.controllers").read_text().split()
            except OSError:
                continue
            if "memory" in offered:
                return True
    return False
