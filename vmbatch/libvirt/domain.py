"""DomainSpec -> libvirt domain XML. The only place vmbatch produces XML.

Format: https://libvirt.org/formatdomain.html (libvirt 9.0). Built with ElementTree
``SubElement`` in a fixed child order and indented with ``ET.indent``, so the output is stable
(golden files) and every path or value is escaped by the serializer, never by hand.

Choices worth knowing:
- ``<cpu mode='host-passthrough'/>`` on KVM; on TCG ``mode='maximum'`` (QEMU's ``max`` model,
  which emulates RDRAND so the guest's ``getrandom()`` does not block) unless the site names a
  CPU model. A virtio-rng device is added as well.
- Networking is QEMU's user-mode stack, given as ``<qemu:commandline>`` arguments (see
  :func:`_network`): no bridge, no host addresses, optionally ``restrict=on``. libvirt 9.0
  rejects ``<portForward>``/passt (9.2+), so the SSH forward to 127.0.0.1 is added through
  the monitor right after start (see ``connection.py``).
- Devices sit on the root PCI bus at fixed slots (no pcie-root-ports).
- A virtio channel for the QEMU guest agent (``org.qemu.guest_agent.0``,
  https://libvirt.org/formatdomain.html#channel): where the image runs ``qemu-ga``, the
  host sets the guest's clock after a pause (:meth:`Connection.set_guest_time`); where it
  does not, the port is unused.
- The serial console goes through virtlogd (``<log file=...>``), which writes the file as root
  with rollover, instead of QEMU writing it directly.
- ``on_poweroff``/``on_crash`` destroy: a guest that stops ends the job's VM.
- An image without a kernel boots from its own disk: the firmware (SeaBIOS unless the
  image names a ``firmware`` ROM) runs the bootloader in the image (GRUB, syslinux), which
  loads the image's kernel. The base disk carries ``<boot order='1'/>``, the only boot
  device: libvirt then gives QEMU ``bootindex=1`` and ``-boot strict=on``, so the
  firmware never tries the seed, the context CD, the empty scratch disks or the NIC
  (https://libvirt.org/formatdomain.html#hard-drives-floppy-disks-cdroms, "boot";
  per-device boot order and ``<os><boot>`` exclude each other).
- CPU pinning is ``<vcpu cpuset='...'>``: the vCPU threads and QEMU's own (emulator, I/O)
  threads may run on those host CPUs only, and float among them, as a job's processes do in
  the scheduler's cpuset (libvirt applies it with ``sched_setaffinity`` and, where it has
  the cgroup cpuset controller, ``cpuset.cpus``).
- Under TCG the translation-block cache is bounded (``<features><tcg><tb-cache>``, libvirt
  8.0+, QEMU's ``-accel tcg,tb-size=``): QEMU 5.0+ reserves 1 GiB by default, and every
  page of it the guest's code fills counts against the VM's memory limit.
- The memory hard limit is not here: ``<memtune><hard_limit>`` also makes libvirt raise
  QEMU's ``RLIMIT_MEMLOCK`` to the limit, which fails without CAP_SYS_RESOURCE (see
  :meth:`vmbatch.libvirt.connection.Connection.create`, which sets it on the paused domain).
- Identity (job id, user, scheduler, image, vmbatch version) lives in ``<metadata>`` under our
  namespace, so ``vmbatch ps`` and orphan clean-up can read it back from libvirt alone.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmbatch.limits import cpu_list

METADATA_NS = "https://vmbatch.dev/xmlns/job/1"
METADATA_PREFIX = "vmbatch"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: QEMU's id of the guest's user-mode network; the monitor's ``hostfwd_add`` names it.
NETDEV_ID = "vmbnet0"
#: PCI slot of the NIC, outside the range libvirt assigns automatically (docs/platform.md).
_NET_ADDR = "0x10"
DOMAIN_PREFIX = "vmbatch-"

DomainType = Literal["kvm", "qemu"]


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """One virtio disk attached to the guest.

    Disks get targets vda, vdb, ... in the order given, on consecutive PCI slots, so the
    guest enumerates them in that order too. ``serial`` (at most 20 characters, the
    virtio-blk limit) shows in the guest as ``/dev/disk/by-id/virtio-<serial>`` and
    ``/sys/block/vdX/serial``, for guests that look disks up by role.
    """

    path: Path
    format: Literal["qcow2", "raw"]
    readonly: bool = False
    serial: str | None = None


@dataclass(frozen=True, slots=True)
class JobMetadata:
    """Who the VM belongs to; stored in the domain's ``<metadata>``."""

    job_id: str
    user: str
    scheduler: str
    image: str
    version: str
    #: Set in a migrated VM's XML at its destination (``vmbatch migrate``): the node whose
    #: job it is. That node's epilogue ends it; the destination's reaper leaves it alone.
    hosted_for: str = ""


@dataclass(frozen=True, slots=True)
class DomainSpec:
    """Everything needed to describe one job's VM to libvirt."""

    name: str
    domain_type: DomainType
    memory_mib: int
    vcpus: int
    machine: str
    disks: tuple[DiskSpec, ...]
    console_log: Path
    metadata: JobMetadata
    emulator: Path
    tcg_cpu_model: str = "max"
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    firmware: Path | None = None
    #: False: QEMU's ``restrict=on``, the guest reaches nothing outside, only the forwarded
    #: SSH port reaches it.
    outbound_network: bool = True
    #: Host CPUs (OS numbering) the VM's threads may run on; empty: not pinned.
    cpuset: tuple[int, ...] = ()
    #: TCG's translation-block cache in MiB; 0: QEMU's default (1 GiB). Ignored under KVM.
    tb_cache_mib: int = 0


def domain_name(job_id: str) -> str:
    """The libvirt domain name for a job: ``vmbatch-`` plus the id with odd characters
    replaced (libvirt names end up in file names and log lines)."""
    return DOMAIN_PREFIX + re.sub(r"[^A-Za-z0-9._-]", "_", job_id)[:100]


def build_xml(spec: DomainSpec) -> str:
    """Serialize ``spec`` to libvirt domain XML (a ``str``)."""
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    ET.register_namespace("qemu", QEMU_NS)
    dom = ET.Element("domain", type=spec.domain_type)
    _text(dom, "name", spec.name)
    _metadata(dom, spec.metadata)
    _text(dom, "memory", str(spec.memory_mib), unit="MiB")
    vcpu = _text(dom, "vcpu", str(spec.vcpus))
    if spec.cpuset:
        vcpu.set("placement", "static")
        vcpu.set("cpuset", cpu_list(spec.cpuset))
    _os(dom, spec)
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if spec.domain_type == "qemu" and spec.tb_cache_mib:
        tcg = ET.SubElement(features, "tcg")
        _text(tcg, "tb-cache", str(spec.tb_cache_mib), unit="MiB")
    _cpu(dom, spec)
    ET.SubElement(dom, "clock", offset="utc")
    _text(dom, "on_poweroff", "destroy")
    _text(dom, "on_reboot", "restart")
    _text(dom, "on_crash", "destroy")
    _devices(dom, spec)
    _network(dom, spec)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def _text(parent: ET.Element, tag: str, text: str, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    el.text = text
    return el


def _metadata(dom: ET.Element, meta: JobMetadata) -> None:
    md = ET.SubElement(dom, "metadata")
    job = ET.SubElement(md, f"{{{METADATA_NS}}}job")
    for tag, value in (
        ("id", meta.job_id),
        ("user", meta.user),
        ("scheduler", meta.scheduler),
        ("image", meta.image),
        ("version", meta.version),
    ):
        _text(job, f"{{{METADATA_NS}}}{tag}", value)
    if meta.hosted_for:
        _text(job, f"{{{METADATA_NS}}}hosted-for", meta.hosted_for)


def _os(dom: ET.Element, spec: DomainSpec) -> None:
    os_el = ET.SubElement(dom, "os")
    _text(os_el, "type", "hvm", arch="x86_64", machine=spec.machine)
    if spec.firmware is not None:
        _text(os_el, "loader", str(spec.firmware), readonly="yes", type="rom")
    if spec.kernel is not None:
        _text(os_el, "kernel", str(spec.kernel))
        if spec.initrd is not None:
            _text(os_el, "initrd", str(spec.initrd))
        if spec.cmdline:
            _text(os_el, "cmdline", spec.cmdline)
    # Without a kernel the firmware boots the image's own bootloader from the first disk:
    # see _devices (``<boot order>`` on that disk, not ``<os><boot dev>``).


def _cpu(dom: ET.Element, spec: DomainSpec) -> None:
    if spec.domain_type == "kvm":
        ET.SubElement(dom, "cpu", mode="host-passthrough")
    elif spec.tcg_cpu_model == "max":
        ET.SubElement(dom, "cpu", mode="maximum")
    else:
        cpu = ET.SubElement(dom, "cpu", mode="custom", match="exact")
        _text(cpu, "model", spec.tcg_cpu_model, fallback="forbid")


#: PCI slots on the root bus: the RNG, then the disks in order; the virtio-serial controller
#: (the guest agent's channel) after the NIC.
_RNG_SLOT, _FIRST_DISK_SLOT, _SERIAL_SLOT = 3, 4, 0x11
#: The QEMU guest agent's virtio port: where qemu-ga listens in the guest, and the channel
#: libvirt's agent calls use (``virDomainSetTime`` after a pause).
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"
#: Disk slots end below the NIC's slot.
MAX_DISKS = int(_NET_ADDR, 16) - _FIRST_DISK_SLOT


def _disk_target(index: int) -> str:
    return "vd" + "abcdefghijklmnopqrstuvwxyz"[index]


def _pci(parent: ET.Element, slot: int) -> None:
    """Put a device directly on the root bus (on q35: an integrated endpoint).

    Without an address libvirt puts every device behind its own pcie-root-port and adds a
    spare one for hot-plug, which a throw-away VM never uses; each bridge is one more thing
    for firmware and guest to enumerate.
    """
    ET.SubElement(
        parent,
        "address",
        type="pci",
        domain="0x0000",
        bus="0x00",
        slot=f"0x{slot:02x}",
        function="0x0",
    )


def _devices(dom: ET.Element, spec: DomainSpec) -> None:
    if len(spec.disks) > MAX_DISKS:
        raise ValueError(f"at most {MAX_DISKS} disks fit on the root bus")
    if any(
        d.serial is not None and not re.fullmatch(r"[\w.-]{1,20}", d.serial) for d in spec.disks
    ):
        raise ValueError("a disk serial must be 1-20 letters, digits, '.', '_' or '-'")
    dev = ET.SubElement(dom, "devices")
    _text(dev, "emulator", str(spec.emulator))
    for i, disk in enumerate(spec.disks):
        d = ET.SubElement(dev, "disk", type="file", device="disk")
        ET.SubElement(d, "driver", name="qemu", type=disk.format)
        ET.SubElement(d, "source", file=str(disk.path))
        ET.SubElement(d, "target", dev=_disk_target(i), bus="virtio")
        if disk.readonly:
            ET.SubElement(d, "readonly")
        if disk.serial is not None:
            _text(d, "serial", disk.serial)
        if i == 0 and spec.kernel is None:
            ET.SubElement(d, "boot", order="1")
        _pci(d, _FIRST_DISK_SLOT + i)
    ET.SubElement(dev, "controller", type="usb", model="none")
    serial = ET.SubElement(dev, "serial", type="pty")
    ET.SubElement(serial, "log", file=str(spec.console_log), append="off")
    ET.SubElement(serial, "target", port="0")
    rng = ET.SubElement(dev, "rng", model="virtio")
    _text(rng, "backend", "/dev/urandom", model="random")
    _pci(rng, _RNG_SLOT)
    serial_ctl = ET.SubElement(dev, "controller", type="virtio-serial", index="0")
    _pci(serial_ctl, _SERIAL_SLOT)
    channel = ET.SubElement(dev, "channel", type="unix")  # libvirt picks the socket's path
    ET.SubElement(channel, "target", type="virtio", name=GUEST_AGENT_PORT)
    ET.SubElement(dev, "memballoon", model="none")


def _network(dom: ET.Element, spec: DomainSpec) -> None:
    """QEMU's user-mode network, given on QEMU's command line.

    libvirt 9.0's ``<interface type='user'>`` cannot set ``restrict``, and passt with
    ``<portForward>`` needs libvirt 9.2. With ``restrict=on`` the guest cannot send anything
    beyond QEMU (no DNS relay, no outbound connections): where the host's resolver or peers
    are private addresses, that keeps a guest from touching them. The SSH forward is added
    by ``hostfwd_add`` after start, which ``restrict`` allows.
    """
    restrict = "off" if spec.outbound_network else "on"
    cmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
    for arg in (
        "-netdev",
        f"user,id={NETDEV_ID},restrict={restrict}",
        "-device",
        f"virtio-net-pci,netdev={NETDEV_ID},addr={_NET_ADDR},romfile=",
    ):
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=arg)


def read_metadata(xml: str) -> JobMetadata | None:
    """Parse our ``<metadata>`` back out of a domain's XML; None if it is not ours."""
    root = ET.fromstring(xml)  # noqa: S314 - XML comes from our own libvirtd, not a user
    job = root.find(f"metadata/{{{METADATA_NS}}}job")
    if job is None:
        return None

    def get(tag: str) -> str:
        return job.findtext(f"{{{METADATA_NS}}}{tag}", default="")

    return JobMetadata(
        get("id"), get("user"), get("scheduler"), get("image"), get("version"), get("hosted-for")
    )


def read_files(xml: str) -> tuple[str, ...]:
    """The host files a domain's XML names: disk sources and the serial console's log.

    The reaper tells this node's (this configuration's) VMs from others by them: every
    vmbatch VM has its overlay, seed and console log in its job directory.
    """
    root = ET.fromstring(xml)  # noqa: S314 - XML comes from our own libvirtd, not a user
    files = [s.get("file", "") for s in root.iterfind("devices/disk/source")]
    files += [g.get("file", "") for g in root.iterfind("devices/serial/log")]
    return tuple(f for f in files if f)


@dataclass(frozen=True, slots=True)
class LiveDisk:
    """A file-backed disk of a running domain, as its XML names it."""

    target: str
    path: Path
    format: str
    readonly: bool


def read_disks(xml: str) -> tuple[LiveDisk, ...]:
    """The domain's file-backed disks (``<disk type='file'>``), in XML order."""
    root = ET.fromstring(xml)  # noqa: S314 - XML comes from our own libvirtd, not a user
    disks = []
    for d in root.iterfind("devices/disk"):
        source, target = d.find("source"), d.find("target")
        if d.get("type") != "file" or source is None or target is None:
            continue
        driver = d.find("driver")
        disks.append(
            LiveDisk(
                target.get("dev", ""),
                Path(source.get("file", "")),
                driver.get("type", "raw") if driver is not None else "raw",
                d.find("readonly") is not None,
            )
        )
    return tuple(disks)


def read_boot_files(xml: str) -> tuple[Path, ...]:
    """Host files the domain boots from: kernel, initrd, firmware ROM (those it has)."""
    root = ET.fromstring(xml)  # noqa: S314 - XML comes from our own libvirtd, not a user
    return tuple(
        Path(el.text.strip())
        for tag in ("kernel", "initrd", "loader")
        if (el := root.find(f"os/{tag}")) is not None and el.text and el.text.strip()
    )


def read_cpu_mode(xml: str) -> str:
    """The ``<cpu mode>`` (``maximum``, ``host-passthrough``, ``custom``, ...)."""
    cpu = ET.fromstring(xml).find("cpu")  # noqa: S314 - from our own libvirtd
    return "" if cpu is None else cpu.get("mode", "custom")


def read_uuid(xml: str) -> str:
    """The domain's ``<uuid>`` ("" if none): QEMU's ``-uuid``, kept by a migration."""
    el = ET.fromstring(xml).find("uuid")  # noqa: S314 - from our own libvirtd
    return "" if el is None or not el.text else el.text.strip()


def read_memory_limit_mib(xml: str) -> int | None:
    """The live ``<memtune><hard_limit>`` in MiB, None if there is none."""
    el = ET.fromstring(xml).find("memtune/hard_limit")  # noqa: S314 - from our own libvirtd
    if el is None or not el.text:
        return None
    scale = {"KiB": 1, "k": 1, "KB": 1, "MiB": 1024, "M": 1024, "GiB": 2**20, "G": 2**20}
    return int(el.text) * scale.get(el.get("unit", "KiB"), 1) // 1024


def migration_xml(xml: str, moves: dict[Path, Path], hosted_for: str = "") -> str:
    """The domain XML for a migration's destination (libvirt's ``VIR_MIGRATE_PARAM_DEST_XML``):
    ``xml`` (the source's migratable XML) with each disk source and console log file found
    in ``moves`` renamed, ``<memtune>`` left out, and our metadata's ``hosted-for`` set to
    ``hosted_for`` (the source node's name; metadata is not guest ABI).

    Only host-side parts change, as libvirt requires (the result must pass
    ``virDomainDefCheckABIStability``). ``<memtune>`` goes because at start it makes
    libvirt raise QEMU's RLIMIT_MEMLOCK, which fails without CAP_SYS_RESOURCE (see
    :meth:`vmbatch.libvirt.connection.Connection.create`); the limit is set again live.
    """
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    ET.register_namespace("qemu", QEMU_NS)
    root = ET.fromstring(xml)  # noqa: S314 - XML comes from our own libvirtd, not a user
    for el in [*root.iterfind("devices/disk/source"), *root.iterfind("devices/*/log")]:
        old = el.get("file")
        if old is not None and Path(old) in moves:
            el.set("file", str(moves[Path(old)]))
    memtune = root.find("memtune")
    if memtune is not None:
        root.remove(memtune)
    job = root.find(f"metadata/{{{METADATA_NS}}}job")
    if job is not None and hosted_for:
        for old_el in job.findall(f"{{{METADATA_NS}}}hosted-for"):
            job.remove(old_el)
        _text(job, f"{{{METADATA_NS}}}hosted-for", hosted_for)
    return ET.tostring(root, encoding="unicode") + "\n"


def restore_xml(xml: str, *, cpus: Collection[int]) -> str:
    """The XML to restore a saved domain with (``virDomainRestoreFlags``' ``dxml``): the
    saved image's own XML (``virDomainSaveImageGetXMLDesc``) with what belonged to the
    allocation it was saved under replaced by the job's allocation now.

    - ``<memtune>`` goes: the live memory limit put it there, and in the XML it would make
      libvirt raise QEMU's ``RLIMIT_MEMLOCK`` at start, which fails here
      (:meth:`Connection.create`). The caller sets the limit live after the restore.
    - CPU pinning: ``<vcpu cpuset>`` is set to ``cpus`` (the job's host CPUs now; empty:
      not pinned) and the pins of ``<cputune>`` (``vcpupin``, ``emulatorpin``,
      ``iothreadpin``) go, so that a job requeued onto other CPUs (or another node) does
      not run on the CPUs of its previous allocation.

    Only host-side settings may differ from the saved domain: libvirt parses ``dxml`` and
    checks it against the saved definition with ``virDomainDefCheckABIStability``
    (``qemuSaveImageUpdateDef``, src/qemu/qemu_saveimage.c, libvirt 9.0). That check
    compares the vCPU count and each vCPU's state and order
    (``virDomainDefVcpuCheckAbiStability``), the memory sizes
    (``virDomainMemtuneCheckABIStability``: initial, current, maximum, slots), NUMA,
    features, CPU model, clock, the devices; not ``<vcpu cpuset>`` (``def->cpumask``),
    ``<cputune>`` or ``<memtune>``, which are placement and limits, not guest ABI
    (src/conf/domain_conf.c, ``virDomainDefCheckABIStabilityFlags``). The guest's size
    therefore cannot change here: see :func:`read_size`."""
    root = ET.fromstring(xml)  # noqa: S314 - XML comes from our own libvirtd, not a user
    for memtune in root.findall("memtune"):
        root.remove(memtune)
    vcpu = root.find("vcpu")
    if vcpu is not None:
        for attr in ("placement", "cpuset"):
            vcpu.attrib.pop(attr, None)
        if cpus:
            vcpu.set("placement", "static")
            vcpu.set("cpuset", cpu_list(tuple(cpus)))
    for cputune in root.findall("cputune"):
        for pin in [el for el in cputune if el.tag in _PINS]:
            cputune.remove(pin)
        if len(cputune) == 0:
            root.remove(cputune)
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    ET.register_namespace("qemu", QEMU_NS)
    return ET.tostring(root, encoding="unicode")


#: ``<cputune>`` children that pin threads to host CPUs
#: (https://libvirt.org/formatdomain.html#cpu-tuning).
_PINS = frozenset({"vcpupin", "emulatorpin", "iothreadpin"})

#: Bytes per ``unit`` of a libvirt memory size
#: (https://libvirt.org/formatdomain.html#memory-allocation).
_UNIT_BYTES = {"b": 1, "bytes": 1, "KB": 10**3, "k": 2**10, "KiB": 2**10, "MB": 10**6,
               "M": 2**20, "MiB": 2**20, "GB": 10**9, "G": 2**30, "GiB": 2**30,
               "TB": 10**12, "T": 2**40, "TiB": 2**40}  # fmt: skip


def read_size(xml: str) -> tuple[int, int]:
    """(vCPUs, memory in MiB) of a domain's XML: ``<vcpu>``'s count (its maximum, the vCPU
    threads QEMU has) and ``<memory>`` (https://libvirt.org/formatdomain.html#memory-allocation,
    ``unit`` defaulting to KiB). A saved VM keeps both: libvirt refuses a restore XML that
    changes them (:func:`restore_xml`)."""
    root = ET.fromstring(xml)  # noqa: S314 - XML comes from our own libvirtd, not a user
    vcpus = int((root.findtext("vcpu") or "1").strip())
    memory = root.find("memory")
    text = (memory.text or "").strip() if memory is not None else ""
    if memory is None or not text:
        raise ValueError("the domain XML has no <memory>")
    return vcpus, int(text) * _UNIT_BYTES[memory.get("unit", "KiB")] // 2**20


def machine_type(xml: str) -> str:
    """The domain's machine type as libvirt expanded it (``pc-q35-7.2``); "" if none."""
    root = ET.fromstring(xml)  # noqa: S314 - XML comes from our own libvirtd, not a user
    kind = root.find("os/type")
    return (kind.get("machine", "") if kind is not None else "") or ""


def backing_files(xml: str) -> tuple[str, ...]:
    """The host files under the domain's disks (``<backingStore><source file=...>``, as a
    running domain's live XML shows them): the base images its overlays are made on."""
    root = ET.fromstring(xml)  # noqa: S314 - XML comes from our own libvirtd, not a user
    found = [s.get("file", "") for s in root.iterfind("devices/disk/backingStore//source")]
    return tuple(f for f in found if f)
