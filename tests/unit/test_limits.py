"""Holding a VM to its allocation: CPU lists, Slurm's CPU ids, Torque's cpuset, QEMU's
memory overhead and the VM's size within a grant, QEMU's usage from /proc."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from vmbatch import limits
from vmbatch.config import Config, ConfigError, parse
from vmbatch.errors import JobError
from vmbatch.hooks import slurm, torque
from vmbatch.hooks.accounting import JobEnd
from vmbatch.hooks.request import Resources, VmSize, size_vm
from vmbatch.limits import HostCpu, cpu_list, parse_cpu_list

# -- CPU lists ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", {0}), ("0-3", {0, 1, 2, 3}), ("0-2,5,7-8", {0, 1, 2, 5, 7, 8}), ("4\n", {4})],
)
def test_cpu_lists_round_trip(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(cpu_list(frozenset(cpus))) == cpus


def test_cpu_list_is_compact() -> None:
    assert cpu_list((5, 0, 1, 2, 7, 8)) == "0-2,5,7-8"


@pytest.mark.parametrize("bad", ["", "-1", "3-1", "a", "0,,1", "1-2-3", "0-99999999", " , "])
def test_malformed_cpu_lists_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="CPU"):
        parse_cpu_list(bad)


# -- Slurm's abstract CPU ids ------------------------------------------------------------


def _sysfs(root: Path, cpus: list[tuple[int, int, int]], online: str) -> Path:
    """A /sys/devices/system/cpu tree: (os id, package, core) per CPU."""
    (root / "online").parent.mkdir(parents=True, exist_ok=True)
    (root / "online").write_text(online + "\n")
    for os_id, package, core in cpus:
        topo = root / f"cpu{os_id}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return root


def test_host_topology_is_read_from_sysfs_online_cpus_only(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path, [(0, 0, 0), (1, 0, 1), (2, 0, 2)], "0-1")
    assert limits.host_cpus(sysfs) == (HostCpu(0, 0, 0), HostCpu(1, 0, 1))


def test_slurm_numbers_sockets_then_cores_then_threads() -> None:
    # Two sockets, two cores each, two threads per core; the OS numbers first threads of
    # alternating sockets first (a common two-socket SMT layout).
    cpus = tuple(HostCpu(os_id, package=os_id % 2, core=(os_id // 2) % 2) for os_id in range(8))
    # Slurm: socket 0 core 0 threads (0, 4), core 1 (2, 6), socket 1 core 0 (1, 5), ...
    assert limits.slurm_order(cpus) == (0, 4, 2, 6, 1, 5, 3, 7)
    assert limits.slurm_to_os(frozenset({0, 1}), cpus) == {0, 4}  # one whole core
    assert limits.slurm_to_os(frozenset({4}), cpus) == {1}


def test_slurm_orders_sockets_as_hwloc_does_by_their_lowest_cpu() -> None:
    # xcpuinfo.c's example: 4 sockets of 2 cores, socket ids 0 1 3 2 0 1 3 2. slurmd built
    # with hwloc (Debian's is) takes sockets in hwloc's logical order, by lowest CPU.
    cpus = tuple(HostCpu(i, pkg, i // 4) for i, pkg in enumerate([0, 1, 3, 2, 0, 1, 3, 2]))
    assert limits.slurm_order(cpus) == (0, 4, 1, 5, 2, 6, 3, 7)


def test_slurm_ids_beyond_the_host_or_irregular_cores_map_to_nothing() -> None:
    two = (HostCpu(0, 0, 0), HostCpu(1, 0, 1))
    assert limits.slurm_to_os(frozenset({0, 1}), two) == {0, 1}
    assert limits.slurm_to_os(frozenset({2}), two) is None  # slurm.conf CPUs=4 on 2
    odd = (HostCpu(0, 0, 0), HostCpu(1, 0, 0), HostCpu(2, 0, 1))  # one sibling offline
    assert limits.slurm_to_os(frozenset({0}), odd) is None


# What `scontrol show job -d` of Slurm 22.05 printed here (one line of the record cut).
SCONTROL = """JobId=1874756 JobName=sbatch
   UserId=root(0) GroupId=root(0) MCS_label=N/A
   NodeList=vm
   BatchHost=vm
   NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:*
   TRES=cpu=1,mem=512M,node=1,billing=1
   Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=*
   JOB_GRES=(null)
     Nodes=vm CPU_IDs=1 Mem=512 GRES=
   MinCPUsNode=1 MinMemoryCPU=512M MinTmpDiskNode=0
   WorkDir=/tmp
"""


def test_cpu_ids_of_this_node_from_scontrol() -> None:
    assert slurm.parse_cpu_ids(SCONTROL, "vm") == {1}
    assert slurm.parse_cpu_ids(SCONTROL, "other") is None
    multi = SCONTROL.replace(
        "     Nodes=vm CPU_IDs=1 Mem=512 GRES=",
        "     Nodes=n[01-02] CPU_IDs=0-3,8 Mem=512 GRES=\n     Nodes=n03 CPU_IDs=4 Mem=512 GRES=",
    )
    assert slurm.parse_cpu_ids(multi, "n02") == {0, 1, 2, 3, 8}
    assert slurm.parse_cpu_ids(multi, "n03") == {4}


def test_a_job_name_imitating_a_detail_line_is_refused_not_believed() -> None:
    """Seen with Slurm 22.05: `sbatch -J $'x\\n     Nodes=vm CPU_IDs=0-99 Mem=1 GRES='` puts
    that line into the record before the real one."""
    forged = SCONTROL.replace("JobName=sbatch", "JobName=x\n     Nodes=vm CPU_IDs=0-99 Mem=1 GRES=")
    with pytest.raises(JobError, match="imitate scontrol's output"):
        slurm.parse_cpu_ids(forged, "vm")
    same = SCONTROL.replace("JobName=sbatch", "JobName=x\n     Nodes=vm CPU_IDs=1 Mem=1 GRES=")
    assert slurm.parse_cpu_ids(same, "vm") == {1}  # agrees with Slurm's own line: harmless
    garbled = SCONTROL.replace("WorkDir=/tmp", "WorkDir=/x\n     Nodes=vm CPU_IDs=zz Mem=1 GRES=")
    with pytest.raises(JobError):
        slurm.parse_cpu_ids(garbled, "vm")


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("vm", ["vm"]),
        ("n[01-03,7],login", ["n01", "n02", "n03", "n7", "login"]),
        ("rack[1-2]n[1-2]", ["rack1n1", "rack1n2", "rack2n1", "rack2n2"]),
        ("gpu[9-10]-ib", ["gpu9-ib", "gpu10-ib"]),
    ],
)
def test_hostlists_expand(expr: str, names: list[str]) -> None:
    assert slurm.expand_hostlist(expr) == names


@pytest.mark.parametrize("bad", ["", "a[", "a]", "a[3-1]", "a[1]b[", ",", "a[[1]]", "a[x]"])
def test_malformed_hostlists_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="host"):
        slurm.expand_hostlist(bad)


def test_huge_hostlists_are_refused() -> None:
    with pytest.raises(ValueError, match="too long"):
        slurm.expand_hostlist("n[0-999999]")


def test_huge_hostlists_are_refused_before_they_are_built() -> None:
    """A job name may imitate a detail line (review of issue 15): ranges that would take
    root's Prolog minutes and gigabytes are refused from their size alone."""
    for hostile in ("n[0-99999999999]", "a[0-99999]b[0-99999]", "a[0-9999]b[0-99]c[0-99]"):
        with pytest.raises(ValueError, match="too long"):
            slurm.expand_hostlist(hostile)


# -- Torque's cpuset ---------------------------------------------------------------------


def test_torque_cpuset_paths_follow_the_mounts() -> None:
    mounts = (
        "proc /proc proc rw 0 0\n"
        "cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0\n"
        "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"
        "cpuset /dev/cpuset cpuset rw 0 0\n"
    )
    assert torque.cpuset_files("7.srv", mounts) == [
        Path("/dev/cpuset/torque/7.srv/cpus"),
        Path("/dev/cpuset/torque/7.srv/cpuset.cpus"),
        Path("/sys/fs/cgroup/cpuset/torque/7.srv/cpuset.cpus"),
    ]


def test_torque_cpuset_is_read_when_root_owns_it(tmp_path: Path) -> None:
    base = tmp_path / "cg"
    job = base / "torque" / "7.srv"
    job.mkdir(parents=True)
    (job / "cpuset.cpus").write_text("2-3\n")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup {base} cgroup rw,cpuset 0 0\n")
    if os.geteuid() != 0:
        pytest.skip("the trust check wants root-owned directories")
    assert torque.job_cpuset("7.srv", mounts) == {2, 3}
    assert torque.job_cpuset("8.srv", mounts) is None  # pbs_mom made none
    (job / "cpuset.cpus").write_text("\n")  # an empty cpuset: not a pin target
    assert torque.job_cpuset("7.srv", mounts) is None
    (job / "cpuset.cpus").write_text("1\n")
    job.chmod(0o777)  # writable by anyone: not pbs_mom's alone
    assert torque.job_cpuset("7.srv", mounts) is None


# -- QEMU's memory overhead and the VM within a grant ------------------------------------


def _cfg(**limits_kw: int) -> Config:
    cfg = Config()
    return dataclasses.replace(cfg, limits=dataclasses.replace(cfg.limits, **limits_kw))


def test_overhead_is_fixed_plus_per_gib_plus_the_tcg_cache() -> None:
    cfg = _cfg(qemu_overhead_mib=100, qemu_overhead_per_gib=4)
    cfg = dataclasses.replace(cfg, vm=dataclasses.replace(cfg.vm, tcg_tb_cache_mib=100))
    tb = 120  # the cache and its bookkeeping
    assert limits.qemu_overhead_mib(cfg, 1024, "qemu") == 100 + 4 + tb
    assert limits.qemu_overhead_mib(cfg, 1025, "qemu") == 100 + 5 + tb  # rounded up
    assert limits.qemu_overhead_mib(cfg, 4096, "kvm") == 100 + 16  # no TCG cache
    default_tb = dataclasses.replace(cfg, vm=dataclasses.replace(cfg.vm, tcg_tb_cache_mib=0))
    assert limits.qemu_overhead_mib(default_tb, 0, "qemu") == 100 + 1229  # QEMU's 1 GiB
    assert limits.hard_limit_mib(cfg, 1024, "kvm") == 1024 + 104


def test_a_granted_vm_fits_in_its_grant_qemu_included() -> None:
    cfg = _cfg(qemu_overhead_mib=100, qemu_overhead_per_gib=4)
    node = {"host_cpus": 8, "host_memory": 16384, "reserve_memory": 1024}
    defaults = {"default_vcpus": 1, "default_memory": 256}

    def overhead(guest: int) -> int:
        return limits.qemu_overhead_mib(cfg, guest, "kvm")

    for grant in (300, 1000, 1024, 4096, 15360):
        size = size_vm(Resources(2, grant), **defaults, **node, overhead=overhead)
        assert size.host_memory == grant
        assert (
            size.memory + overhead(size.memory)
            <= grant
            < size.memory + 1 + overhead(size.memory + 1)
        )
    # No grant: the default guest, and QEMU on top of it.
    assert size_vm(Resources(), **defaults, **node, overhead=overhead) == VmSize(1, 256, 357)


def test_a_grant_too_small_for_any_vm_is_refused_with_the_least_that_works() -> None:
    node = {"host_cpus": 8, "host_memory": 16384, "reserve_memory": 1024}
    with pytest.raises(JobError, match="request at least 165 MiB") as err:
        size_vm(
            Resources(1, 160),
            default_vcpus=1,
            default_memory=256,
            **node,
            overhead=lambda guest: 100 + guest // 64,
        )
    assert "hold no VM" in str(err.value)


def test_the_node_keeps_its_reserve_whole_vm_counted() -> None:
    node = {"host_cpus": 8, "host_memory": 4096, "reserve_memory": 1024}
    defaults = {"default_vcpus": 1, "default_memory": 4096}
    with pytest.raises(JobError, match="at most 3072 MiB"):
        size_vm(Resources(1, 3100), **defaults, **node, overhead=lambda _g: 200)
    # A default larger than the node shrinks so that guest and QEMU fit.
    assert size_vm(Resources(), **defaults, **node, overhead=lambda _g: 200) == VmSize(
        1, 2872, 3072
    )


def test_limits_config_is_checked() -> None:
    cfg = parse({"limits": {"pin_cpus": False, "qemu_overhead_mib": 50}})
    assert (cfg.limits.pin_cpus, cfg.limits.qemu_overhead_mib) == (False, 50)
    with pytest.raises(ConfigError) as err:
        parse(
            {
                "limits": {"qemu_overhead_mib": -1, "qemu_overhead_per_gib": -2, "pin": 1},
                "vm": {"tcg_tb_cache_mib": -5},
            }
        )
    text = str(err.value)
    for word in ("qemu_overhead_mib", "qemu_overhead_per_gib", "'pin'", "tcg_tb_cache_mib"):
        assert word in text


# -- QEMU's usage --------------------------------------------------------------------------


def test_qemu_usage_from_proc(tmp_path: Path) -> None:
    pid = tmp_path / "4242"
    pid.mkdir()
    ticks = os.sysconf("SC_CLK_TCK")
    # comm may contain spaces and parentheses; utime and stime are fields 14 and 15.
    fields = ["S", "1", "1", "1", "0", "-1", "0", "0", "0", "0", "0"]
    fields += [str(30 * ticks), str(12 * ticks)] + ["0"] * 30
    (pid / "stat").write_text("4242 (qemu (x) y) " + " ".join(fields) + "\n")
    (pid / "status").write_text("Name:\tqemu\nVmHWM:\t  409600 kB\nVmRSS:\t 1024 kB\n")
    assert limits.qemu_usage(4242, tmp_path) == limits.QemuUsage(42.0, 400)
    assert limits.qemu_usage(4243, tmp_path) is None


# -- the prologue's VM ---------------------------------------------------------------------


def _site(tmp_path: Path, **limits_table: object) -> Config:
    return parse(
        {
            "vm": {"accel": "tcg", "tcg_tb_cache_mib": 128},
            "limits": {"qemu_overhead_mib": 100, "qemu_overhead_per_gib": 4, **limits_table},
            "paths": {"job_dir": str(tmp_path / "jobs")},
            "libvirt": {"uri": "test:///nowhere"},
            "batch": {
                "default_image": "demo",
                "state_dir": str(tmp_path / "state"),
                "user_dir": str(tmp_path / "run"),
                "accounting_log": str(tmp_path / "acct.jsonl"),
            },
            "images": {"demo": {"source": "/nonexistent/demo.qcow2", "memory": 256}},
        }
    )


def test_the_prologue_pins_to_the_schedulers_cpus_and_limits_to_the_grant(
    tmp_path: Path,
) -> None:
    from vmbatch.hooks import batch
    from vmbatch.job import JobUser

    who = JobUser.from_host("nobody")
    asked: list[str] = []

    def cpus() -> frozenset[int]:
        asked.append("cpus")
        return frozenset({1, 3})

    bj = batch.BatchJob("slurm", "5", "nobody", Resources(2, 1024), find_cpus=cpus)
    cfg = _site(tmp_path)
    spec = batch.job_spec(cfg, bj, who)
    assert (spec.vcpus, spec.cpus, spec.memory_limit) == (2, {1, 3}, 1024)
    assert spec.memory == 767 and limits.hard_limit_mib(cfg, 767, "qemu") == 1024
    off = batch.job_spec(_site(tmp_path, pin_cpus=False, memory_limit=False), bj, who)
    assert (off.cpus, off.memory_limit, off.memory) == (frozenset(), None, spec.memory)
    assert asked == ["cpus"]  # not asked at all with pinning off
    unknown = dataclasses.replace(bj, find_cpus=lambda: None)
    assert batch.job_spec(_site(tmp_path), unknown, who).cpus == frozenset()


def test_an_ambiguous_cpu_record_fails_the_job_not_the_node(tmp_path: Path) -> None:
    from vmbatch.hooks import batch
    from vmbatch.hooks.jobstate import StateStore

    forged = SCONTROL.replace("JobName=sbatch", "JobName=x\n     Nodes=vm CPU_IDs=0 Mem=1 GRES=")
    bj = batch.BatchJob(
        "slurm",
        "6",
        "nobody",
        Resources(1, 512),
        find_cpus=lambda: slurm.parse_cpu_ids(forged, "vm"),
    )
    cfg = _site(tmp_path)
    error = batch.prologue(cfg, bj)
    assert isinstance(error, JobError) and "imitate scontrol's output" in str(error)
    record = StateStore(cfg.batch.state_dir).read("6")
    assert record is not None and record.phase == "failed"
    batch.finish(cfg, "6", end=JobEnd(65, 0, "slurmctld"), account=True)


def test_memory_cgroup_presence_from_the_mounts(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0\n")
    assert not limits.memory_cgroup_present(mounts)
    mounts.write_text("cgroup /x cgroup rw,nosuid,memory 0 0\n")
    assert limits.memory_cgroup_present(mounts)
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("cpuset cpu io pids\n")
    mounts.write_text(f"cgroup2 {unified} cgroup2 rw 0 0\n")
    assert not limits.memory_cgroup_present(mounts)
    (unified / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert limits.memory_cgroup_present(mounts)


def test_the_accounting_line_carries_the_vms_cpus_limit_and_qemus_usage(tmp_path: Path) -> None:
    import json

    from vmbatch.hooks import batch
    from vmbatch.hooks.jobstate import READY, Record

    cfg = _site(tmp_path)
    record = Record(
        "9", "slurm", "u", phase=READY, started=1.0, boot_seconds=2.0, cpus="2-3",
        memory_limit_mib=512,
    )  # fmt: skip
    batch.write_accounting(cfg, "9", record, JobEnd(0, 0), limits.QemuUsage(12.5, 300))
    batch.write_accounting(cfg, "10", None, None)  # no prologue: nothing known
    first, second = (json.loads(ln) for ln in cfg.batch.accounting_log.read_text().splitlines())
    assert (first["cpus"], first["memory_limit_mib"]) == ("2-3", 512)
    assert (first["qemu_cpu_seconds"], first["qemu_peak_rss_mib"]) == (12.5, 300)
    assert [second[k] for k in ("cpus", "qemu_cpu_seconds", "qemu_peak_rss_mib")] == [None] * 3
