"""Live migration's pieces that need no daemon: the destination XML, what is read from a
domain's XML, and the refusals (tests/system/test_migrate.py migrates a real VM)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vmbatch import migrate
from vmbatch.config import Config, LibvirtConfig
from vmbatch.errors import MigrationRefusedError
from vmbatch.libvirt.connection import Connection
from vmbatch.libvirt.domain import (
    DiskSpec,
    DomainSpec,
    JobMetadata,
    LiveDisk,
    build_xml,
    migration_xml,
    read_boot_files,
    read_cpu_mode,
    read_disks,
    read_files,
    read_memory_limit_mib,
    read_metadata,
)

SRC, DST = Path("/var/lib/vmbatch/jobs/42"), Path("/var/lib/vmbatch/jobs-b/42")
KERNEL = Path("/var/cache/vmbatch/guests/tiny/vmlinux")


def _xml(**kw: object) -> str:
    spec: dict[str, object] = {
        "name": "vmbatch-42",
        "domain_type": "qemu",
        "memory_mib": 256,
        "vcpus": 1,
        "machine": "q35",
        "disks": (
            DiskSpec(SRC / "overlay.qcow2", "qcow2"),
            DiskSpec(SRC / "seed.iso", "raw", readonly=True),
        ),
        "console_log": SRC / "console.log",
        "metadata": JobMetadata("42", "alice", "slurm", "demo", "0.1.0"),
        "emulator": Path("/usr/bin/qemu-system-x86_64"),
        "kernel": KERNEL,
        "initrd": KERNEL.with_name("initrd.cpio"),
    }
    spec.update(kw)
    return build_xml(DomainSpec(**spec))  # type: ignore[arg-type]


def test_what_a_migration_reads_from_the_domain_xml() -> None:
    xml = _xml()
    assert read_disks(xml) == (
        LiveDisk("vda", SRC / "overlay.qcow2", "qcow2", readonly=False),
        LiveDisk("vdb", SRC / "seed.iso", "raw", readonly=True),
    )
    assert read_boot_files(xml) == (KERNEL, KERNEL.with_name("initrd.cpio"))
    assert read_cpu_mode(xml) == "maximum"
    assert read_cpu_mode(_xml(tcg_cpu_model="qemu64")) == "custom"
    assert read_memory_limit_mib(xml) is None
    limited = xml.replace(
        "<vcpu>", "<memtune><hard_limit unit='KiB'>524288</hard_limit></memtune><vcpu>"
    )
    assert read_memory_limit_mib(limited) == 512


def test_the_destination_xml_moves_the_job_files_and_drops_memtune() -> None:
    xml = _xml().replace(
        "<vcpu>", "<memtune><hard_limit unit='KiB'>524288</hard_limit></memtune><vcpu>"
    )
    moves = {SRC / n: DST / n for n in ("overlay.qcow2", "seed.iso", "console.log")}
    out = migration_xml(xml, moves)
    assert set(read_files(out)) == {str(p) for p in moves.values()}
    assert read_memory_limit_mib(out) is None
    assert read_metadata(out) == read_metadata(xml)
    # Everything else is untouched, the QEMU namespace (the user network) included.
    assert out.count("qemu:commandline") == 2
    assert migration_xml(out, {v: k for k, v in moves.items()}).replace("\n", "").replace(
        " ", ""
    ) == migration_xml(xml, {}).replace("\n", "").replace(" ", "")


def _plan(tmp_path: Path, **kw: object) -> migrate.MigrationPlan:
    base: dict[str, object] = {
        "name": "vmbatch-42",
        "disks": (),
        "boot_files": (),
        "moves": (),
        "memory_limit_mib": None,
        "cpu_mode": "maximum",
        "dest_xml": "",
    }
    base.update(kw)
    return migrate.MigrationPlan(**base)  # type: ignore[arg-type]


def test_the_destination_must_have_the_identical_backing_and_boot_files(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel 1")
    check = migrate._file_check(kernel)
    migrate.prepare_destination(Config(), _plan(tmp_path, boot_files=(check,)))  # the same

    kernel.write_bytes(b"kernel 2")  # same size, other bytes
    with pytest.raises(MigrationRefusedError, match="differs on the destination"):
        migrate.prepare_destination(Config(), _plan(tmp_path, boot_files=(check,)))
    kernel.unlink()
    with pytest.raises(MigrationRefusedError, match="missing on the destination"):
        migrate.prepare_destination(Config(), _plan(tmp_path, boot_files=(check,)))


def test_read_only_disks_are_copied_privately_and_nothing_is_overwritten(tmp_path: Path) -> None:
    seed = tmp_path / "src" / "seed.iso"
    seed.parent.mkdir()
    seed.write_bytes(b"cidata")
    dest = tmp_path / "dst" / "seed.iso"
    plan = _plan(tmp_path, disks=(migrate.DiskMove("vdb", seed, dest, "raw", readonly=True),))
    assert migrate.prepare_destination(Config(), plan) == [dest.parent, dest]
    assert dest.read_bytes() == b"cidata"
    assert dest.stat().st_mode & 0o777 == 0o600
    assert dest.parent.stat().st_mode & 0o777 == 0o711  # QEMU (another user) passes through
    # A second time the file exists: refused, and the first copy is left alone.
    with pytest.raises(MigrationRefusedError, match="exists on the destination"):
        migrate.prepare_destination(Config(), plan)
    assert dest.read_bytes() == b"cidata"


class _Versions:
    def __init__(self, hypervisor: str) -> None:
        self.hypervisor = hypervisor

    def version(self) -> tuple[str, str]:
        return "9.0.0", self.hypervisor


@pytest.mark.parametrize(
    ("mode", "there", "refused"),
    [
        ("maximum", "7.2.0", False),
        ("maximum", "8.0.0", True),
        ("host-passthrough", "8.0.0", True),
        ("custom", "8.0.0", False),  # a named model: libvirt and QEMU check it themselves
    ],
)
def test_a_host_dependent_cpu_migrates_only_to_the_same_hypervisor(
    tmp_path: Path, mode: str, there: str, refused: bool
) -> None:
    plan = _plan(tmp_path, cpu_mode=mode)
    here, dest = _Versions("7.2.0"), _Versions(there)
    if refused:
        with pytest.raises(MigrationRefusedError, match=f"mode {mode}.*QEMU 7.2.0.*QEMU {there}"):
            migrate._check_hypervisors(here, dest, plan, "qemu+ssh://b/system")  # type: ignore[arg-type]
    else:
        migrate._check_hypervisors(here, dest, plan, "qemu+ssh://b/system")  # type: ignore[arg-type]


def test_a_domain_that_is_not_running_is_refused(tmp_path: Path) -> None:
    with Connection(LibvirtConfig(uri="test:///default")) as conn:
        with pytest.raises(MigrationRefusedError, match="vmbatch-nosuch: the domain is gone"):
            migrate.migrate(Config(), conn, "vmbatch-nosuch", "test:///default", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_the_destination_xml_says_whose_job_the_vm_is() -> None:
    """The destination's reaper has no record of a migrated VM: its metadata names the node
    whose job it is (set once, however often the XML is made)."""
    hosted = migration_xml(migration_xml(_xml(), {}, hosted_for="node1"), {}, hosted_for="n2")
    meta, before = read_metadata(hosted), read_metadata(_xml())
    assert meta is not None and before is not None
    assert meta.hosted_for == "n2" and before.hosted_for == ""
    assert dataclasses.replace(meta, hosted_for="") == before
    assert hosted.count("hosted-for>") == 2  # one element: its start and end tags
