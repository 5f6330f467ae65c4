"""Domain XML: golden files, escaping, metadata, and acceptance by libvirt's test driver."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from vmbatch.libvirt.domain import (
    DiskSpec,
    DomainSpec,
    JobMetadata,
    build_xml,
    domain_name,
    read_metadata,
    read_size,
    restore_xml,
)

GOLDEN = Path(__file__).parent / "golden"
JOB = Path("/var/lib/vmbatch/jobs/42")


def _spec(**kw: object) -> DomainSpec:
    base: dict[str, object] = {
        "name": "vmbatch-42",
        "domain_type": "qemu",
        "memory_mib": 256,
        "vcpus": 2,
        "machine": "q35",
        "disks": (
            DiskSpec(JOB / "overlay.qcow2", "qcow2"),
            DiskSpec(JOB / "seed.iso", "raw", readonly=True),
        ),
        "console_log": JOB / "console.log",
        "metadata": JobMetadata("42", "alice", "slurm", "demo", "0.1.0"),
        "emulator": Path("/usr/bin/qemu-system-x86_64"),
    }
    base.update(kw)
    return DomainSpec(**base)  # type: ignore[arg-type]


CASES = {
    "tcg-direct-kernel": _spec(
        kernel=Path("/var/cache/vmbatch/guests/tiny/vmlinux"),
        initrd=Path("/var/cache/vmbatch/guests/tiny/initrd.cpio"),
        cmdline="console=ttyS0 quiet",
        firmware=Path("/usr/share/qemu/qboot.rom"),
    ),
    "kvm-disk-boot": _spec(domain_type="kvm", vcpus=4, memory_mib=4096, outbound_network=False),
    "tcg-named-cpu": _spec(tcg_cpu_model="qemu64"),
    "tcg-pinned": _spec(cpuset=(1, 2, 3, 6), tb_cache_mib=128),
    "extra-disks": _spec(
        disks=(
            DiskSpec(JOB / "overlay.qcow2", "qcow2"),
            DiskSpec(JOB / "cvmfs-cache.qcow2", "qcow2", serial="vmbatch-cvmfs"),
            DiskSpec(JOB / "scratch.qcow2", "qcow2", serial="vmbatch-scratch"),
            DiskSpec(JOB / "seed.iso", "raw", readonly=True),
        )
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str, request: pytest.FixtureRequest, test_uri: str) -> None:
    xml = build_xml(CASES[case])
    golden = GOLDEN / f"{case}.xml"
    if request.config.getoption("--regenerate-golden"):
        golden.write_text(xml)
    assert xml == golden.read_text()
    # The golden XML must also be acceptable to libvirt itself.
    conn = libvirt.open(test_uri)
    try:
        dom = conn.createXML(xml, 0)
        assert read_metadata(dom.XMLDesc(0)) == CASES[case].metadata
        dom.destroy()
    finally:
        conn.close()


def test_hostile_paths_are_escaped_and_survive_a_round_trip() -> None:
    nasty = Path("/var/lib/vmbatch/jobs/a&b'c\"d<e>f/overlay.qcow2")
    xml = build_xml(_spec(disks=(DiskSpec(nasty, "qcow2"),), cmdline="x", kernel=Path("/k&<'\">")))
    assert "&amp;" in xml and "&lt;" in xml
    root = ET.fromstring(xml)
    assert root.find("devices/disk/source").get("file") == str(nasty)  # type: ignore[union-attr]
    assert root.findtext("os/kernel") == "/k&<'\">"


def test_metadata_with_markup_round_trips() -> None:
    meta = JobMetadata("1<2>&3", "o'neil", "torque", 'img"x', "0.1")
    assert read_metadata(build_xml(_spec(metadata=meta))) == meta


def test_foreign_domain_has_no_metadata() -> None:
    assert read_metadata("<domain type='qemu'><name>other</name></domain>") is None


def test_an_image_without_kernel_boots_from_its_base_disk_only() -> None:
    for domain_type in ("qemu", "kvm"):
        root = ET.fromstring(build_xml(_spec(domain_type=domain_type, disks=root_disks())))
        assert root.find("os/kernel") is None and root.find("os/boot") is None
        boots = [
            (d.find("source").get("file"), b.get("order"))  # type: ignore[union-attr]
            for d in root.iterfind("devices/disk")
            if (b := d.find("boot")) is not None
        ]
        assert boots == [(str(JOB / "overlay.qcow2"), "1")]
    direct = ET.fromstring(build_xml(CASES["tcg-direct-kernel"]))
    assert direct.find("os/kernel") is not None
    assert not list(direct.iter("boot"))  # the firmware loads the given kernel, no disk


def root_disks() -> tuple[DiskSpec, ...]:
    return (
        DiskSpec(JOB / "overlay.qcow2", "qcow2"),
        DiskSpec(JOB / "cvmfs-cache.qcow2", "qcow2", serial="vmbatch-cvmfs"),
        DiskSpec(JOB / "context.iso", "raw", readonly=True),
        DiskSpec(JOB / "seed.iso", "raw", readonly=True),
    )


def test_cpu_per_accelerator() -> None:
    kvm = ET.fromstring(build_xml(_spec(domain_type="kvm")))
    assert kvm.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    tcg = ET.fromstring(build_xml(_spec()))
    assert tcg.find("cpu").get("mode") == "maximum"  # type: ignore[union-attr]


def test_domain_name_is_safe() -> None:
    assert domain_name("123.server.example.org") == "vmbatch-123.server.example.org"
    assert domain_name("1/../x y") == "vmbatch-1_.._x_y"
    assert len(domain_name("9" * 500)) == len("vmbatch-") + 100


def test_network_is_user_mode_and_restricted_on_request() -> None:
    def args(spec: DomainSpec) -> list[str]:
        root = ET.fromstring(build_xml(spec))
        q = "{http://libvirt.org/schemas/domain/qemu/1.0}"
        return [str(a.get("value")) for a in root.iter(f"{q}arg")]

    assert args(_spec())[:2] == ["-netdev", "user,id=vmbnet0,restrict=off"]
    assert args(_spec(outbound_network=False))[1] == "user,id=vmbnet0,restrict=on"
    assert args(_spec())[3] == "virtio-net-pci,netdev=vmbnet0,addr=0x10,romfile="
    assert ET.fromstring(build_xml(_spec())).find("devices/interface") is None


def test_test_driver_rejects_garbage(test_uri: str) -> None:
    conn = libvirt.open(test_uri)
    try:
        with pytest.raises(libvirt.libvirtError):
            conn.createXML("<domain type='qemu'><name>x</name></domain>", 0)
    finally:
        conn.close()


def test_disks_get_targets_and_slots_in_order_and_serials_are_checked() -> None:
    xml = ET.fromstring(build_xml(CASES["extra-disks"]))
    disks = xml.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb", "vdc", "vdd"]  # type: ignore[union-attr]
    assert [d.findtext("serial") for d in disks] == [None, "vmbatch-cvmfs", "vmbatch-scratch", None]
    slots = [int(d.find("address").get("slot"), 16) for d in disks]  # type: ignore[union-attr, arg-type]
    assert slots == sorted(slots) and len(set(slots)) == 4
    with pytest.raises(ValueError, match="serial"):
        build_xml(_spec(disks=(DiskSpec(JOB / "x", "qcow2", serial="a" * 21),)))
    with pytest.raises(ValueError, match="serial"):
        build_xml(_spec(disks=(DiskSpec(JOB / "x", "qcow2", serial="a b"),)))


def test_pinning_and_the_translation_cache() -> None:
    root = ET.fromstring(build_xml(_spec(cpuset=(3, 0, 1), tb_cache_mib=64)))
    vcpu = root.find("vcpu")
    assert vcpu is not None and vcpu.text == "2"
    assert (vcpu.get("placement"), vcpu.get("cpuset")) == ("static", "0-1,3")
    assert root.findtext("features/tcg/tb-cache") == "64"
    assert root.find("features/tcg/tb-cache").get("unit") == "MiB"  # type: ignore[union-attr]
    plain = ET.fromstring(build_xml(_spec()))
    assert plain.find("vcpu").attrib == {}  # type: ignore[union-attr]
    assert plain.find("features/tcg") is None  # QEMU's own default cache
    kvm = ET.fromstring(build_xml(_spec(domain_type="kvm", tb_cache_mib=64)))
    assert kvm.find("features/tcg") is None  # no translation under KVM
    assert root.find("memtune") is None  # set live: see Connection.create


def _saved(cputune: str) -> str:
    """A running domain's XML as a save file holds it: pinned to CPUs 5-6 of the job's
    earlier allocation, its live memory limit in ``<memtune>``, and ``cputune``."""
    xml = build_xml(_spec(cpuset=(5, 6)))
    extra = "<memtune><hard_limit unit='KiB'>700000</hard_limit></memtune>" + cputune
    return xml.replace("</vcpu>", "</vcpu>" + extra, 1)


def test_restore_xml_pins_to_the_new_allocation_and_drops_the_old_pins(test_uri: str) -> None:
    pins = "<vcpupin vcpu='0' cpuset='5'/><vcpupin vcpu='1' cpuset='6'/><emulatorpin cpuset='5-6'/>"
    saved = _saved(f"<cputune><shares>2048</shares>{pins}</cputune>")
    out = ET.fromstring(restore_xml(saved, cpus=frozenset({2, 0})))
    vcpu = out.find("vcpu")
    assert vcpu is not None and vcpu.attrib == {"placement": "static", "cpuset": "0,2"}
    cputune = out.find("cputune")
    assert cputune is not None and [el.tag for el in cputune] == ["shares"]  # not a pin: kept
    assert out.find("memtune") is None  # set live after the restore
    # Not pinned where the job's run now is not; a <cputune> of pins only goes whole.
    bare = ET.fromstring(restore_xml(_saved(f"<cputune>{pins}</cputune>"), cpus=()))
    assert bare.find("vcpu").attrib == {}  # type: ignore[union-attr]
    assert bare.find("cputune") is None
    # Everything else, the guest ABI libvirt checks (vCPUs, memory, devices), is the save's.
    for tree in (out, bare):
        for tag in ("vcpu", "cputune", "memtune"):
            for el in tree.findall(tag):
                tree.remove(el)
    original = ET.fromstring(saved)
    for tag in ("vcpu", "cputune", "memtune"):
        for el in original.findall(tag):
            original.remove(el)
    assert ET.tostring(out) == ET.tostring(bare) == ET.tostring(original)
    assert read_size(restore_xml(saved, cpus={1})) == read_size(saved) == (2, 256)
    # libvirt takes it as a definition.
    conn = libvirt.open(test_uri)
    try:
        conn.createXML(restore_xml(saved, cpus={0, 1}), 0).destroy()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("memory", "mib"),
    [
        ("<memory unit='KiB'>262144</memory>", 256),
        ("<memory>262144</memory>", 256),  # KiB by default
        ("<memory unit='GiB'>2</memory>", 2048),
        ("<memory unit='b'>1073741824</memory>", 1024),
    ],
)
def test_read_size_reads_vcpus_and_memory_in_mib(memory: str, mib: int) -> None:
    xml = f"<domain><vcpu placement='static' cpuset='1'>3</vcpu>{memory}</domain>"
    assert read_size(xml) == (3, mib)
