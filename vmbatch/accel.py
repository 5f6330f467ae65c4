"""Which accelerator guests use: KVM when it really works, TCG otherwise.

``/dev/kvm`` existing proves little: on nested hosts it opens, ``KVM_CREATE_VM`` succeeds, and
guests still hang or QEMU aborts (``failed to set MSR 0x10a``) once a real CPU model is set.
So ``accel = "auto"`` runs a real probe: QEMU is started with KVM and the CPU mode vmbatch
would use (``-cpu host``, i.e. libvirt's ``host-passthrough``), executing a 64 KiB firmware
of our own whose reset vector writes a magic byte to QEMU's ``isa-debug-exit`` port. Only if
QEMU exits with the matching status within ``[vm].accel_probe_timeout`` is KVM used.
The answer is cached in ``/run/vmbatch/accel.json`` together with the kernel's boot id, so
the probe runs once per boot of the host.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from vmbatch import process, state
from vmbatch.config import Config
from vmbatch.errors import AcceleratorError, CommandError, CommandTimeoutError

log = logging.getLogger(__name__)

CACHE_FILE = Path("/run/vmbatch/accel.json")
KVM_DEVICE = Path("/dev/kvm")

#: ``isa-debug-exit`` turns a write of V into QEMU exit status (V << 1) | 1.
_MAGIC = 0x2A
_EXPECTED_STATUS = (_MAGIC << 1) | 1

AccelName = Literal["kvm", "tcg"]


@dataclass(frozen=True, slots=True)
class AccelChoice:
    """The accelerator in use and a sentence saying why."""

    accel: AccelName
    reason: str

    @property
    def domain_type(self) -> Literal["kvm", "qemu"]:
        return "kvm" if self.accel == "kvm" else "qemu"


def probe_firmware() -> bytes:
    """A 64 KiB BIOS image: at the reset vector ``mov al,MAGIC; out 0xf4,al; hlt; jmp $``."""
    rom = bytearray(b"\xf4" * 65536)  # hlt everywhere
    code = bytes([0xB0, _MAGIC, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
    rom[0xFFF0 : 0xFFF0 + len(code)] = code
    return bytes(rom)


def choose(cfg: Config, *, use_cache: bool = True) -> AccelChoice:
    """Decide the accelerator for ``cfg`` (probing and caching for ``auto``)."""
    wanted = cfg.vm.accel
    if wanted == "tcg":
        return AccelChoice("tcg", 'configured: [vm].accel = "tcg"')
    if wanted == "kvm":
        if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
            raise AcceleratorError(
                f'[vm].accel = "kvm" but {KVM_DEVICE} is missing or not accessible',
                hint='load the kvm module, or set [vm].accel = "auto" or "tcg"',
            )
        return AccelChoice("kvm", 'configured: [vm].accel = "kvm"')
    boot_id = state.boot_id()
    if use_cache:
        cached = _read_cache(boot_id)
        if cached is not None:
            return cached
    choice = probe(cfg)
    _write_cache(boot_id, choice)
    return choice


def probe(cfg: Config) -> AccelChoice:
    """Start a minimal KVM guest with ``-cpu host``; KVM if it runs and exits as expected."""
    if not KVM_DEVICE.exists():
        return AccelChoice("tcg", f"auto: {KVM_DEVICE} does not exist, using TCG")
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return AccelChoice("tcg", f"auto: {KVM_DEVICE} is not accessible, using TCG")
    timeout = cfg.vm.accel_probe_timeout
    with tempfile.TemporaryDirectory(prefix="vmbatch-accel-") as tmp:
        rom = Path(tmp) / "probe.rom"
        rom.write_bytes(probe_firmware())
        argv = [
            str(cfg.tools.qemu_system),
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-machine",
            "q35",
            "-m",
            "16",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-bios",
            str(rom),
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]
        try:
            res = process.run(argv, timeout=timeout, check=False)
        except CommandTimeoutError:
            return AccelChoice(
                "tcg", f"auto: a KVM test guest hung for {timeout:.0f}s (nested KVM?), using TCG"
            )
        except CommandError as exc:
            return AccelChoice("tcg", f"auto: cannot run the KVM probe ({exc}), using TCG")
    if res.returncode == _EXPECTED_STATUS:
        return AccelChoice("kvm", "auto: a KVM test guest with -cpu host ran correctly")
    last = res.stderr.strip().splitlines()[0] if res.stderr.strip() else ""
    return AccelChoice(
        "tcg",
        f"auto: a KVM test guest failed (exit {res.returncode}{': ' + last if last else ''}),"
        " using TCG",
    )


def _read_cache(boot_id: str) -> AccelChoice | None:
    try:
        data = json.loads(CACHE_FILE.read_text())
        if data.get("boot_id") == boot_id and data.get("accel") in ("kvm", "tcg"):
            return AccelChoice(data["accel"], str(data["reason"]) + " (cached this boot)")
    except (OSError, ValueError, KeyError):
        pass
    return None


def _write_cache(boot_id: str, choice: AccelChoice) -> None:
    try:
        CACHE_FILE.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = CACHE_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps({"boot_id": boot_id, **asdict(choice)}))
        tmp.replace(CACHE_FILE)
    except OSError as exc:  # not fatal: we simply probe again next time
        log.warning("cannot cache the accelerator probe in %s: %s", CACHE_FILE, exc)


def _main() -> int:
    """``python -m vmbatch.accel``: print ``kvm`` or ``tcg`` (the reason on stderr).

    Used by ``scripts/ensure-libvirtd`` before any configuration exists, with defaults.
    """
    import sys

    from vmbatch.config import parse

    choice = probe(parse({}))
    sys.stderr.write(choice.reason + "\n")
    sys.stdout.write(choice.accel + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
